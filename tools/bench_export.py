#!/usr/bin/env python3
"""Benchmark edgekit's exports of the MLPerf Tiny ResNet-8 on the whole CIFAR-10 test set.

For each runtime: integer outputs compared with the reference executor (share of logits
equal, rows identical, largest gap in LSB, top-1 agreement), top-1 accuracy, median latency
(1 thread, batch 1). Then Vela's Ethos-U estimates. Usage:

    python tools/bench_export.py [--limit N] [--runs 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def _latency_tflite(data: bytes, x1: np.ndarray, xnnpack: bool, runs: int) -> float:
    from edgekit.export.tflite import make_interpreter

    it = make_interpreter(data, xnnpack=xnnpack)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    ts = []
    for k in range(runs + 10):
        it.set_tensor(i, x1)
        t0 = time.perf_counter()
        it.invoke()
        ts.append(time.perf_counter() - t0)
        it.get_tensor(o)
        del k
    return float(np.median(ts[10:]) * 1e6)


def _latency_ort(data: bytes, x1: np.ndarray, runs: int) -> float:
    from edgekit.export.onnx_qdq import make_session

    s = make_session(data)
    name = s.get_inputs()[0].name
    feed = {name: (x1.astype(np.int16) + 128).astype(np.uint8)}
    ts = []
    for _ in range(runs + 10):
        t0 = time.perf_counter()
        s.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[10:]) * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, help="first N test images only")
    ap.add_argument("--runs", type=int, default=300, help="latency runs per runtime")
    ap.add_argument("--targets", default="ethos-u55-128,ethos-u55-256,ethos-u65-256,ethos-u85-256")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import edgekit
    from edgekit.export.onnx_qdq import compare, integer_kernels, run_onnxruntime, to_onnx
    from edgekit.export.tflite import quantize_input, run_tflite, to_tflite_bytes
    from edgekit.export.vela import compile_for_ethos_u

    d = np.load(DATA / "cifar10_test.npz")
    x, y = d["x"], d["y"]
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    calib = np.load(DATA / "cifar10_calib_train1000.npz")["x"].astype(np.float32)
    qm = edgekit.quantize(str(DATA / "resnet8_cifar10_fp32.onnx"), calib, weight_bits=8, progress=False)
    t0 = time.perf_counter()
    ref = qm.run(x.astype(np.float32), integer=True)[qm.outputs[0].name]
    t_ref = time.perf_counter() - t0
    xq = quantize_input(qm, x)
    tfl, _ = to_tflite_bytes(qm)
    onx = to_onnx(qm).SerializeToString()
    official = (DATA / "mlperf_tiny_resnet8_int8_reference.tflite").read_bytes()
    rows = []

    def row(name: str, out: np.ndarray, lat: float | None) -> None:
        c = compare(out, ref)
        c.update(runtime=name, top1=float((out.argmax(-1) == y).mean()), latency_us=lat)
        rows.append(c)

    rows.append(
        {
            "runtime": "edgekit reference executor (numpy)",
            "n": len(x),
            "equal_share": 1.0,
            "rows_identical": 1.0,
            "max_lsb": 0,
            "mean_lsb": 0.0,
            "top1_agreement": 1.0,
            "top1": float((ref.argmax(-1) == y).mean()),
            "latency_us": t_ref / len(x) * 1e6,
        }
    )
    x1 = xq[:1]
    row(
        "LiteRT builtin kernels (no delegate)",
        run_tflite(tfl, xq, batch=500),
        _latency_tflite(tfl, x1, False, args.runs),
    )
    row(
        "LiteRT + XNNPACK (default delegate)",
        run_tflite(tfl, xq, xnnpack=True, batch=500),
        _latency_tflite(tfl, x1, True, args.runs),
    )
    row("onnxruntime 1.31 QDQ (QLinear kernels)", run_onnxruntime(onx, xq), _latency_ort(onx, x1, args.runs))
    # peer: the official MLPerf int8 model, builtin vs XNNPACK (its own gap, not vs our reference)
    off_b = run_tflite(official, xq, batch=1)
    off_x = run_tflite(official, xq, xnnpack=True, batch=1)
    g = compare(off_x, off_b)
    peer = {
        "official_int8_top1": float((off_b.argmax(-1) == y).mean()),
        "official_xnnpack_vs_builtin": g,
        "official_latency_us_xnnpack": _latency_tflite(official, x1, True, args.runs),
    }

    print(f"ResNet-8 (MLPerf Tiny) on {len(x)} CIFAR-10 test images; integer logits vs edgekit's reference\n")
    hdr = (
        f"{'runtime':42s} {'equal':>8s} {'rows=':>8s} {'maxLSB':>7s} {'meanLSB':>8s} {'top1 agr':>9s} "
        f"{'top-1':>7s} {'us/img':>8s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['runtime']:42s} {r['equal_share']:8.2%} {r['rows_identical']:8.2%} {r['max_lsb']:7d} "
            f"{r['mean_lsb']:8.3f} {r['top1_agreement']:9.2%} {r['top1']:7.2%} {r['latency_us']:8.1f}"
        )
    print(f"\nonnxruntime kernels after QDQ fusion: {integer_kernels(onx)}")
    print(
        f"peer: official MLPerf int8 .tflite top-1 {peer['official_int8_top1']:.2%}; "
        "its XNNPACK vs builtin (softmax int8 outputs): "
        f"{g['equal_share']:.2%} logits equal, max {g['max_lsb']} LSB, top-1 agreement {g['top1_agreement']:.2%}; "
        f"{peer['official_latency_us_xnnpack']:.1f} us/img with XNNPACK"
    )

    vela = []
    tfl1, _ = to_tflite_bytes(qm, batch=1)
    print(
        f"\n{'Ethos-U target':16s} {'system config':30s} {'MHz':>5s} {'cycles':>9s} {'ms/inf':>8s} "
        f"{'SRAM KiB':>9s} {'DRAM KiB':>9s} {'flash KiB':>9s} {'CPU ops':>7s}"
    )
    for t in [s for s in args.targets.split(",") if s]:
        with tempfile.TemporaryDirectory() as tmp:
            e = compile_for_ethos_u(tfl1, t, out_dir=tmp)
        vela.append(e.to_json())
        print(
            f"{t:16s} {e.system_config:30s} {e.core_clock_hz / 1e6:5.0f} {e.cycles_total:9d} "
            f"{e.inference_time_ms:8.3f} {e.sram_used_bytes / 1024:9.1f} {e.dram_used_bytes / 1024:9.1f} "
            f"{(e.off_chip_flash_used_bytes + e.on_chip_flash_used_bytes) / 1024:9.1f} {len(e.cpu_ops):7d}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "peer": peer, "vela": vela}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
