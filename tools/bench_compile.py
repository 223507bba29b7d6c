#!/usr/bin/env python3
"""Benchmark edgekit's TVM compile path against peers, batch 1, 1 and 2 threads, medians.

Rows: edgekit untuned, edgekit tuned (MetaSchedule, --trials, persistent database), LiteRT with
XNNPACK (ResNet-8: the MLPerf Tiny int8 reference file; MobileNetV2-shaped: edgekit's own TFLite
export of the same QuantModel), onnxruntime int8 (QDQ) and float. Models: ResNet-8 (real weights,
quantized by edgekit) and a 224x224 MobileNetV2-shaped model with random weights generated here.
Plus the share of int8 peak reached by the tensorized (VNNI) GEMM on a large matrix product.

    python tools/bench_compile.py [--trials 0] [--out bench.md]

Timings on a shared, loaded 2-core machine are noisy: every cell is measured once in each of
--rounds interleaved rounds and reports the median of its rounds; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def median_us(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def set_tvm_threads(n: int) -> None:
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, n)


_ARTIFACTS: dict[tuple[int, bool], Path] = {}


def bench_edgekit(qm, x_int8: np.ndarray, threads: int, runs: int, tune: bool, trials: int, search: str) -> float:
    """Compile once per (model, tuned); time in a fresh process with TVM_NUM_THREADS, as the device
    runtimes run an artifact (in one process the thread pool can only be re-sized through
    config_threadpool, which also pins threads to cores: measured 14 us slower on ResNet-8 here)."""
    import subprocess

    from edgekit.artifact import unpack_artifact
    from edgekit.compile import compile_model

    key = (id(qm), tune)
    if key not in _ARTIFACTS:
        td = Path(tempfile.mkdtemp(prefix="edgekit-bench-"))
        res = compile_model(
            qm, "host", td / "m.tar", tune=tune, trials=trials, verify=True, tune_options={"search": search}
        )
        m = unpack_artifact(res.path, td / "u")
        np.save(td / "x.npy", x_int8)
        _ARTIFACTS[key] = td / "u" / m["model_file"]
    so = _ARTIFACTS[key]
    out = subprocess.run(
        [sys.executable, __file__, "--time-library", str(so), str(so.parent.parent / "x.npy"), str(runs)],
        env={**os.environ, "TVM_NUM_THREADS": str(threads)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def _time_library(so: str, x_npy: str, runs: int) -> float:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(so), tvm.cpu())
    a = tvm.runtime.tensor(np.load(x_npy))
    return median_us(lambda: vm["main"](a), runs, warmup=20)


def bench_litert(path: str, x: np.ndarray, threads: int, runs: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=path, num_threads=threads)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], x.astype(inp["dtype"]).reshape(inp["shape"]))

    def run():
        it.invoke()

    return median_us(run, runs)


def bench_ort(path: str, feed: dict, threads: int, runs: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return median_us(lambda: s.run(None, feed), runs)


PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(void) {  /* 12 independent vpdpbusd chains: the core's int8 multiply-add throughput */
  __m512i acc[12], x = _mm512_set1_epi32(0x01020304), y = _mm512_set1_epi32(0x05060708);
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_epi32(i);
  long n = 50000000; struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], x, y);
    __asm__ volatile("" : "+v"(x));
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  int sum = 0; for (int i = 0; i < 12; i++) sum += _mm512_reduce_add_epi32(acc[i]);
  double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  printf("%.1f %d\n", n * 12.0 * 64 * 2 / s / 1e9, sum & 1);
  return 0;
}
"""


def measured_vnni_peak() -> float | None:
    """GOPS of a register-resident vpdpbusd loop on one core (best of 3), or None without a C compiler."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as td:
        src, exe = Path(td) / "peak.c", Path(td) / "peak"
        src.write_text(PEAK_C)
        subprocess.run([cc, "-O2", "-mavx512f", "-mavx512bw", "-mavx512vnni", str(src), "-o", str(exe)], check=True)
        return max(
            float(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()[0])
            for _ in range(3)
        )


def gemm_share_of_peak(n: int = 1024, threads: int = 1) -> tuple[float, float, str]:
    """GOPS of the VNNI-tensorized GEMM (default knobs) and the core's measured int8 peak."""
    import tvm
    from tvm import te

    from edgekit.compile.targets import get_target
    from kernels import space as ks
    from kernels import tensorize as kt

    tgt = get_target("host").tvm_target()
    intrin = kt.intrin_for(tgt)
    if intrin != kt.VNNI_INTRIN:
        return float("nan"), float("nan"), "no VNNI on this CPU"
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(n, n)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, n)).astype(np.int8)
    wp = kt.pack_weight(w, 16, 4)
    X = te.placeholder((n, n), "int8", name="x")
    W = te.placeholder(wp.shape, "int8", name="w")
    acc = kt.gemm_packed_acc(X, W, "uint8")
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, W, acc]))
    knobs = ks.default_knobs(sch, "gemm", intrin)
    ks.apply_schedule(sch, "gemm", intrin, knobs, threads=threads)
    f = tvm.compile(sch.mod, tgt)
    set_tvm_threads(threads)
    out = tvm.runtime.tensor(np.zeros([int(d) for d in acc.shape], np.int32))
    a, b = tvm.runtime.tensor(x), tvm.runtime.tensor(wp)
    us = median_us(lambda: f(a, b, out), 7, warmup=2)
    gops = 2 * n**3 / (us * 1e-6) / 1e9
    tile = f"{knobs['row_block']} x {knobs['col_block']} blocks"
    peak = measured_vnni_peak()
    if peak is not None:
        return gops, peak * threads, f"{tile}; peak measured by a register-resident vpdpbusd loop"
    mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    peak = mhz / 1e3 * 2 * 64 * 2 * threads  # GHz x 2 vpdpbusd/cycle x 64 MAC x 2 ops
    return gops, peak, f"{tile}; no C compiler: peak assumed, {mhz:.0f} MHz x 2 512-bit vpdpbusd per cycle"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--time-library"]:  # the child process of bench_edgekit
        print(f"{_time_library(argv[1], argv[2], int(argv[3])):.3f}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials for the tuned rows (0: skip them)")
    ap.add_argument("--search", default="evolutionary", choices=["evolutionary", "replay"])
    ap.add_argument("--runs", type=int, default=200, help="timed runs for ResNet-8 (MobileNetV2: runs/20)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--skip-mobilenet", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each cell reports their median")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    import edgekit
    from edgekit.compile.build import quantize_input

    threads = [int(t) for t in args.threads.split(",")]
    lines = [
        "| model | runtime | " + " | ".join(f"{t} thread(s) us" for t in threads) + " |",
        "|---|---|" + "---|" * len(threads),
    ]
    test = np.load(DATA / "cifar10_test.npz")["x"][:1].astype(np.float32)
    calib = np.load(DATA / "cifar10_calib_train1000.npz")["x"][:200].astype(np.float32)
    r8 = edgekit.quantize(DATA / "resnet8_cifar10_fp32.onnx", calib, weight_bits=8, progress=False)
    models = [("ResNet-8 (CIFAR-10)", r8, quantize_input(r8, test), args.runs, None, None)]
    work = Path(tempfile.mkdtemp())
    if not args.skip_mobilenet:  # a float MobileNetV2 (generated weights) quantized by edgekit: every peer runs it
        from edgekit import zoo

        mb_onnx = zoo.mobilenet_v2_like(work / "mobilenet_v2_like.onnx")
        mb = edgekit.quantize(mb_onnx, zoo.synthetic_images(16, size=224, seed=5), progress=False)
        xf = zoo.synthetic_images(1, size=224, seed=3)
        models.append(
            (
                "MobileNetV2-shaped 224x224 (generated weights)",
                mb,
                quantize_input(mb, xf),
                max(5, args.runs // 20),
                xf,
                mb_onnx,
            )
        )

    todo: list[tuple[str, str, object]] = []

    def row(model: str, name: str, fn) -> None:
        todo.append((model, name, fn))

    import onnxruntime as ort

    from edgekit.export.onnx_qdq import export_onnx
    from edgekit.export.tflite import export_tflite

    for model, qm, x8, runs, xf, float_onnx in models:
        row(
            model,
            "edgekit TVM untuned",
            lambda t, qm=qm, x8=x8, runs=runs: bench_edgekit(qm, x8, t, runs, False, 0, args.search),
        )
        if args.trials:
            row(
                model,
                f"edgekit TVM tuned ({args.trials} trials, {args.search})",
                lambda t, qm=qm, x8=x8, runs=runs: bench_edgekit(qm, x8, t, runs, True, args.trials, args.search),
            )
        if qm is r8:
            tfl, tfl_name = str(DATA / "mlperf_tiny_resnet8_int8_reference.tflite"), "MLPerf int8 .tflite"
            float_onnx, feed_f = str(DATA / "resnet8_cifar10_fp32.onnx"), {"input_1": test}
        else:
            tfl, tfl_name = str(work / "mb.tflite"), "edgekit .tflite export"
            export_tflite(qm, tfl)
            feed_f = {"image": xf}
        row(model, f"LiteRT XNNPACK ({tfl_name})", lambda t, tfl=tfl, x8=x8, runs=runs: bench_litert(tfl, x8, t, runs))
        row(
            model,
            "onnxruntime float32",
            lambda t, f=str(float_onnx), feed=feed_f, runs=runs: bench_ort(f, feed, t, runs),
        )
        q = str(work / f"{len(todo)}_qdq.onnx")
        export_onnx(qm, q)
        i0 = ort.InferenceSession(q, providers=["CPUExecutionProvider"]).get_inputs()[0]
        if "uint8" in i0.type:  # the QDQ export takes uint8 codes (int8 + 128)
            xin = (x8.astype(np.int16) + 128).astype(np.uint8)
        else:
            xin = x8 if "int8" in i0.type else next(iter(feed_f.values()))
        row(
            model,
            "onnxruntime int8 (QDQ export)",
            lambda t, q=q, i0=i0, xin=xin, runs=runs: bench_ort(q, {i0.name: xin}, t, runs),
        )
    # every cell measured once per round, rounds interleaved, the median of the rounds reported: a burst
    # of load from elsewhere on a shared machine then hits one round of every row, not one row
    seen: dict[tuple[int, int], list] = {}
    for rnd in range(args.rounds):
        for i, (model, name, fn) in enumerate(todo):
            for t in threads:
                try:
                    seen.setdefault((i, t), []).append(fn(t))
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    seen[(i, t)] = [f"n/a ({type(exc).__name__}: {str(exc)[:60]})"]
            got = ", ".join(str(seen[(i, t)][-1]) for t in threads)
            print(f"round {rnd + 1}: {model} / {name}: {got}", flush=True)
    for i, (model, name, _fn) in enumerate(todo):
        vals = [seen[(i, t)] for t in threads]
        cells = [v[0] if isinstance(v[0], str) else f"{statistics.median(v):.0f}" for v in vals]
        lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    gops, peak, note = gemm_share_of_peak(1024, 1)
    lines.append("")
    lines.append(
        f"Large GEMM 1024x1024x1024 int8 (VNNI tensorized, 1 thread): {gops:.0f} GOPS of a "
        f"{peak:.0f} GOPS peak = {100 * gops / peak:.0f}% ({note})."
    )
    print(lines[-1])
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
