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
        n = 1000 if quick else 10000
        return {
            "model": data / "resnet8_cifar10_fp32.onnx",
            "calib": np.load(data / "cifar10_calib_train1000.npz")["x"],
            "x": test["x"][:n],
            "y": test["y"][:n],
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


def run_demo(workdir: Path, quick: bool = False) -> dict[str, Any]:
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
    result.update(_compile_stage(qm, workdir, x[:200], console))

    from rich.table import Table

    table = Table(title="edgekit demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    return result


def _compile_stage(qm: QuantModel, workdir: Path, x: np.ndarray, console) -> dict[str, Any]:
    """Compile for the host with TVM and check the compiled model bit-exact (when built)."""
    try:
        from edgekit.compile import compile_model, run_artifact_locally  # type: ignore[attr-defined]
    except ImportError:
        return {}
    out = workdir / "model.host.tar"
    t = time.perf_counter()
    compile_model(qm, "host", out)
    compile_s = time.perf_counter() - t
    ref = qm.run(x, integer=True)
    got, latency_ms = run_artifact_locally(out, x)
    name = qm.outputs[0].name
    exact = float((got[name] == ref[name]).all(axis=tuple(range(1, ref[name].ndim))).mean())
    console.print(f"compiled for host in {compile_s:.1f} s; bit-exact fraction {exact:.4f}")
    return {
        "compile_seconds_host": round(compile_s, 2),
        "compiled_bit_exact_fraction": exact,
        "latency_ms_compiled_host": round(latency_ms, 4),
    }
