"""Pareto sweep of mixed 4/8-bit ResNet-8: the ILP's allocation at a range of size budgets,
scored on CIFAR-10, plotted as accuracy against weight size and against latency (per-layer
latencies measured on this host's TVM-compiled kernels, cached in ~/.cache/edgekit/latency),
with the chosen budget's point marked. Writes PNG + JSON.

    python tools/pareto_resnet8.py [--limit 10000] [--chosen 0.65] [--method hessian] [--out-dir bench-results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
BUDGETS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DATA / "resnet8_cifar10_fp32.onnx"))
    p.add_argument("--calib", default=str(DATA / "cifar10_calib_train1000.npz"))
    p.add_argument("--test", default=str(DATA / "cifar10_test.npz"))
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--chosen", type=float, default=0.65, help="the export's size budget, marked on the plot")
    p.add_argument("--method", default="hessian", choices=["hessian", "measured"])
    p.add_argument("--target", default="host", help="latency table target (host: this machine's compiled kernels)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency panel (no TVM builds)")
    p.add_argument("--out-dir", default="bench-results")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekit.graph.onnx_import import import_onnx
    from edgekit.mixed.plan import plan_mixed, quantize_with_bits, sensitivity
    from edgekit.quant.calibrate import collect

    calib = np.load(args.calib)["x"].astype(np.float32)
    test = np.load(args.test)
    tx, ty = test["x"][: args.limit].astype(np.float32), test["y"][: args.limit]
    graph = import_onnx(args.model)
    out_name = graph.outputs[0]
    stats = collect(graph, calib, progress=False)
    sens = sensitivity(graph, calib, stats, args.method)
    latency, overhead, lat_info = None, 0.0, {}
    if not args.no_latency:
        from edgekit.mixed.latency import latency_table, model_overhead

        t = time.perf_counter()
        latency, lat_info = latency_table(graph, stats, target=args.target, progress=print)
        overhead = model_overhead(graph, stats, latency, target=args.target)
        lat_info.update(overhead_ms=overhead, seconds=round(time.perf_counter() - t, 1))

    points: dict[str, dict] = {}
    for budget in sorted(set(BUDGETS) | {args.chosen}):
        qm, report = plan_mixed(
            graph, calib, max_size=budget, stats=stats, sens=sens, latency=latency, latency_overhead_ms=overhead
        )
        bits = report["mixed"]["bits"]
        key = json.dumps(bits, sort_keys=True)
        if key not in points:
            acc = float((qm.run(tx)[out_name].argmax(-1) == ty).mean())
            points[key] = {
                "bits": bits,
                "top1": acc,
                "size_fraction": report["mixed"]["achieved"]["size_fraction"],
                "latency_ms": report["mixed"]["achieved"]["latency_ms_predicted"],
                "budgets": [],
            }
            print(f"budget {budget:.2f}: size {points[key]['size_fraction']:.3f} top-1 {acc:.4f}", flush=True)
        points[key]["budgets"].append(budget)
    int4 = quantize_with_bits(graph, {"*": 4}, stats, calib=calib)
    int4_acc = float((int4.run(tx)[out_name].argmax(-1) == ty).mean())
    int4_lat = None if latency is None else overhead + sum(t[4] for t in latency.values())
    pts = sorted(points.values(), key=lambda q: q["size_fraction"])
    chosen = next(q for q in pts if args.chosen in q["budgets"])

    panels = 1 if latency is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([q["size_fraction"] for q in pts], [100 * q["top1"] for q in pts], "o-", label=f"ILP ({args.method})")
    ax.plot([0.5], [100 * int4_acc], "s", color="gray", label="uniform int4")
    ax.plot(
        [chosen["size_fraction"]],
        [100 * chosen["top1"]],
        "*",
        ms=18,
        color="red",
        label=f"chosen (budget {args.chosen:.2f})",
    )
    ax.axvline(args.chosen, color="red", lw=0.8, ls="--")
    ax.set_xlabel("weight bytes / int8 weight bytes")
    ax.set_ylabel(f"top-1 % (CIFAR-10, {len(ty)} test images)")
    ax.set_title("ResNet-8 mixed 4/8-bit: accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if latency is not None:
        ax = axes[0][1]
        lp = sorted(pts, key=lambda q: q["latency_ms"])
        ax.plot([q["latency_ms"] for q in lp], [100 * q["top1"] for q in lp], "o", label="ILP allocations")
        ax.plot([int4_lat], [100 * int4_acc], "s", color="gray", label="uniform int4")
        ax.plot([chosen["latency_ms"]], [100 * chosen["top1"]], "*", ms=18, color="red", label="chosen")
        ax.set_xlabel("latency ms (predicted: measured per-layer times + overhead)")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"accuracy vs latency on {args.target}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "pareto_resnet8.png"
    fig.savefig(png, dpi=110)
    (out / "pareto_resnet8.json").write_text(
        json.dumps(
            {
                "points": pts,
                "int4": {"top1": int4_acc, "latency_ms": int4_lat},
                "chosen_budget": args.chosen,
                "latency": lat_info,
                "latency_table_ms": latency,
                "method": args.method,
                "test_images": int(len(ty)),
            },
            indent=1,
        )
    )
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
