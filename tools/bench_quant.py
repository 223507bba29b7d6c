#!/usr/bin/env python3
"""Quantization accuracy and export time, side by side in one run, on CIFAR-10 ResNet-8:
edgekit dyadic int8 / int4 vs onnxruntime quantize_static vs the official MLPerf Tiny int8 TFLite.

Calibrates on cifar10_calib_train1000.npz only; evaluates on all of cifar10_test.npz.
Usage: python tools/bench_quant.py [--data ../shared/data] [--limit N] [--markdown]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edgekit

ROOT = Path(__file__).resolve().parents[1]


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 500].astype(np.float32)})[0] for i in range(0, len(x), 500)])


def ort_quantize_static(model: Path, calib: np.ndarray, out: Path) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input_1": calib[i : i + 1].astype(np.float32)} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    pre = out.with_name("pre.onnx")
    quant_pre_process(str(model), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return time.perf_counter() - t


def tflite_run(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zp = inp["quantization"]
    res = []
    for img in x:
        it.set_tensor(inp["index"], np.clip(np.round(img[None] / scale) + zp, -128, 127).astype(np.int8))
        it.invoke()
        res.append(it.get_tensor(out["index"])[0].astype(np.float32))
    return np.stack(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md")
    args = ap.parse_args()
    data = Path(args.data)
    model = data / "resnet8_cifar10_fp32.onnx"
    calib = np.load(data / "cifar10_calib_train1000.npz")["x"]
    test = np.load(data / "cifar10_test.npz")
    x, y = test["x"][: args.limit], test["y"][: args.limit]
    rows = []
    float_logits = ort_run(model, x)
    rows.append(("float32 (onnxruntime)", top1(float_logits, y), 1.0, None))
    for bits in (8, 4):
        t = time.perf_counter()
        qm = edgekit.quantize(model, calib, weight_bits=bits, progress=False)
        secs = time.perf_counter() - t
        z = qm.run(x)["Identity"]
        rows.append(
            (f"edgekit dyadic W{bits}A8", top1(z, y), float((z.argmax(1) == float_logits.argmax(1)).mean()), secs)
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ort_int8.onnx"
        secs = ort_quantize_static(model, calib, out)
        z = ort_run(out, x)
        rows.append(
            (
                "onnxruntime quantize_static (QDQ, per-channel, MinMax)",
                top1(z, y),
                float((z.argmax(1) == float_logits.argmax(1)).mean()),
                secs,
            )
        )
    z = tflite_run(data / "mlperf_tiny_resnet8_int8_reference.tflite", x)
    rows.append(
        (
            "MLPerf Tiny official int8 TFLite (LiteRT builtin)",
            top1(z, y),
            float((z.argmax(1) == float_logits.argmax(1)).mean()),
            None,
        )
    )
    lines = [
        f"ResNet-8, CIFAR-10 test, n = {len(x)} (calibration: 1000 train images)",
        "",
        "| model | top-1 | top-1 agreement with float | export time (s) |",
        "|---|---|---|---|",
    ]
    for name, acc, agree, secs in rows:
        t = "" if secs is None else f"{secs:.1f}"
        lines.append(f"| {name} | {100 * acc:.2f}% | {100 * agree:.2f}% | {t} |")
    table = "\n".join(lines)
    print(table)
    if args.readme:
        write_readme_section(ROOT / "README.md", "quant-table", table)


def write_readme_section(readme: Path, key: str, text: str) -> None:
    """Replace the text between <!-- key --> and <!-- /key --> in the README."""
    s = readme.read_text()
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    if start not in s or end not in s:
        raise SystemExit(f"{readme} has no {start} ... {end} section")
    head, rest = s.split(start, 1)
    readme.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
