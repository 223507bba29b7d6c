"""``edgekit demo``: the whole flow on an embedded default, on this host.

With ``../shared/data`` beside the project (or ``EDGEKIT_DATA``) it uses the real
CIFAR-10 ResNet-8 and measures accuracy; otherwise a generated MobileNet-style model and
synthetic images, where it measures agreement with the float model.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import zoo
from edgekit.qmodel import QuantModel


def shared_data_dir() -> Path | None:
    """``EDGEKIT_DATA`` or ``../shared/data``; ``EDGEKIT_DATA=none`` forces the generated model."""
    if os.environ.get("EDGEKIT_DATA", "").lower() == "none":
        return None
    candidates = [
        os.environ.get("EDGEKIT_DATA"),
        Path(__file__).resolve().parents[2] / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
    ]
    for c in candidates:
        if c and (Path(c) / "resnet8_cifar10_fp32.onnx").exists():
            return Path(c)
    return None


def _median_ms(fn, runs: int = 50) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def default_problem(workdir: Path, quick: bool) -> dict[str, Any]:
    """The model, calibration data and evaluation data the demo uses."""
    data = shared_data_dir()
    if data is not None:
        test = np.load(data / "cifar10_test.npz")
        step = 10 if quick else 1  # the test set is sorted by class: a stride keeps all classes
        return {
            "model": data / "resnet8_cifar10_fp32.onnx",
            "calib": np.load(data / "cifar10_calib_train1000.npz")["x"],
            "x": test["x"][::step],
            "y": test["y"][::step],
            "label": "ResNet-8 on CIFAR-10 (shared/data)",
        }
    path = zoo.tiny_cnn(workdir / "tiny_cnn.onnx")
    return {
        "model": path,
        "calib": zoo.synthetic_images(256, seed=5),
        "x": zoo.synthetic_images(500 if quick else 2000),
        "y": None,
        "label": "generated MobileNet-style CNN on synthetic images",
    }


def run_demo(workdir: Path, quick: bool = False, table_to_stderr: bool = False) -> dict[str, Any]:
    import onnxruntime as ort
    from rich.console import Console

    from edgekit.cli import integer_only
    from edgekit.quant.dyadic import quantize_model

    console = Console(stderr=True)
    workdir.mkdir(parents=True, exist_ok=True)
    prob = default_problem(workdir, quick)
    console.print(f"[bold]edgekit demo[/bold]: {prob['label']}")
    sess = ort.InferenceSession(str(prob["model"]), providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    x = prob["x"].astype(np.float32)
    float_out = sess.run(None, {in_name: x})[0]

    t = time.perf_counter()
    qm: QuantModel = quantize_model(prob["model"], prob["calib"], weight_bits=8, progress=True)
    quant_s = time.perf_counter() - t
    path = qm.save(workdir / "model.int8.ekq")
    qm4 = quantize_model(prob["model"], prob["calib"], weight_bits=4, progress=False)
    q_out = qm.run(x)[qm.outputs[0].name]
    q4_out = qm4.run(x)[qm4.outputs[0].name]

    result: dict[str, Any] = {
        "model": str(prob["model"]),
        "n": int(len(x)),
        "quantize_seconds": round(quant_s, 2),
        "saved": str(path),
        "integer_only": integer_only(qm),
        "agreement_with_float_int8": float((q_out.argmax(-1) == float_out.argmax(-1)).mean()),
        "agreement_with_float_int4": float((q4_out.argmax(-1) == float_out.argmax(-1)).mean()),
        "weight_bytes_int8": qm.weight_bytes(),
        "weight_bytes_int4": qm4.weight_bytes(),
    }
    if prob["y"] is not None:
        y = prob["y"]
        result.update(
            {
                "top1_float": float((float_out.argmax(-1) == y).mean()),
                "top1_int8": float((q_out.argmax(-1) == y).mean()),
                "top1_int4": float((q4_out.argmax(-1) == y).mean()),
            }
        )
    one = x[:1]
    result["latency_ms_reference_executor"] = round(_median_ms(lambda: qm.run(one), 20), 3)
    result["latency_ms_onnxruntime_float"] = round(_median_ms(lambda: sess.run(None, {in_name: one}), 200), 3)
    result.update(_compile_stage(qm, workdir, prob["x"][:200], console))

    from rich.table import Table

    table = Table(title="edgekit demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console(stderr=table_to_stderr).print(table)
    return result


def _compile_stage(qm: QuantModel, workdir: Path, x: np.ndarray, console) -> dict[str, Any]:
    """Compile for this host with TVM, deploy through the device agent on ``local://``, profile
    it there, and validate it bit-exact against the reference executor."""
    from edgekit.compile import compile_model
    from edgekit.device.profile import profile
    from edgekit.device.transports import open_session
    from edgekit.device.validate import validate

    t = time.perf_counter()
    result = compile_model(qm, "host", workdir / "model.host.tar", progress=None)
    compile_s = time.perf_counter() - t
    console.print(f"compiled for the host with TVM in {compile_s:.1f} s: {result.path}")
    data = workdir / "validation.npz"
    np.savez(data, x=x)
    url = f"local://?root={workdir / 'device'}"
    with open_session(url) as session:
        prof = profile(session, result.path, runs=200, warmup=10)
        report = validate(session, result.path, data, reference=workdir / "model.int8.ekq")
    console.print(f"device {url}: median {prof['median_ms']:.3f} ms, bit-exact {report['bit_exact_fraction']:.4f}")
    return {
        "compile_seconds_host": round(compile_s, 2),
        "device": "local (this host, through the device agent)",
        "latency_ms_compiled_median": round(prof["median_ms"], 4),
        "latency_ms_compiled_p90": round(prof["p90_ms"], 4),
        "compiled_bit_exact_fraction": report["bit_exact_fraction"],
        "compiled_max_lsb_diff": report["max_lsb_diff"],
    }
