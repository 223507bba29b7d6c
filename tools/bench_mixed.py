"""Mixed 4/8-bit precision on ResNet-8 / CIFAR-10: top-1 on the full test set for int8, the ILP's
allocation at a size budget (Hessian and measured sensitivities), uniform int4 and random
allocations of about the same size; writes a Markdown table and a JSON file.

    python tools/bench_mixed.py [--budget 0.65] [--limit N] [--out-dir bench-results]

Sensitivities and calibration use only the calibration set; the test set is used only to score.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DATA / "resnet8_cifar10_fp32.onnx"))
    p.add_argument("--calib", default=str(DATA / "cifar10_calib_train1000.npz"))
    p.add_argument("--test", default=str(DATA / "cifar10_test.npz"))
    p.add_argument("--budget", type=float, default=0.65, help="weight bytes as a fraction of int8")
    p.add_argument("--limit", type=int, default=None, help="score on the first N test images only")
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--out-dir", default="bench-results")
    args = p.parse_args(argv)

    from edgekit.graph.onnx_import import import_onnx
    from edgekit.mixed.ilp import residual_ties
    from edgekit.mixed.plan import plan_mixed, quantize_with_bits, random_allocation, sensitivity
    from edgekit.quant.calibrate import collect

    calib = np.load(args.calib)["x"].astype(np.float32)
    test = np.load(args.test)
    tx, ty = test["x"].astype(np.float32), test["y"]
    if args.limit:
        tx, ty = tx[: args.limit], ty[: args.limit]
    graph = import_onnx(args.model)
    out_name = graph.outputs[0]
    t0 = time.perf_counter()
    stats = collect(graph, calib, progress=False)
    t_cal = time.perf_counter() - t0
    params = {n.name: int(n.attrs["weight"].size) for n in graph.nodes if n.op in ("conv2d", "dense")}
    int8_bytes = float(sum(params.values()))
    ties = residual_ties(graph)

    rows: list[dict] = []

    def score(label: str, qm, **extra) -> dict:
        t = time.perf_counter()
        pred = qm.run(tx)[out_name].argmax(-1)
        row = {
            "model": label,
            "top1": float((pred == ty).mean()),
            "weight_bytes": qm.weight_bytes(),
            "size_fraction": qm.weight_bytes() / int8_bytes,
            "bits": {n.name: n.attrs["weight_bits"] for n in qm.nodes if "weight" in n.params},
            "eval_seconds": round(time.perf_counter() - t, 1),
            **extra,
        }
        rows.append(row)
        print(f"{label:28s} top-1 {row['top1']:.4f}  size {row['size_fraction']:.3f}", flush=True)
        return row

    score("int8", quantize_with_bits(graph, {}, stats, calib=calib))
    sens = {}
    mixed_rows = {}
    for method in ("hessian", "measured"):
        t = time.perf_counter()
        sens[method] = sensitivity(graph, calib, stats, method)
        qm, report = plan_mixed(graph, calib, max_size=args.budget, stats=stats, sens=sens[method])
        export_s = t_cal + (time.perf_counter() - t)
        mixed_rows[method] = score(
            f"mixed@{args.budget:.2f} ({method})",
            qm,
            export_seconds=round(export_s, 1),
            sensitivity_seconds=round(sens[method].seconds, 1),
            ilp_seconds=report["mixed"]["ilp"]["solve_seconds"],
        )
    score("uniform int4", quantize_with_bits(graph, {"*": 4}, stats, calib=calib))
    target = min(r["weight_bytes"] for r in mixed_rows.values())
    rand = []
    for seed in range(args.random_seeds):
        bits = random_allocation(
            params, ties, max_bytes=args.budget * int8_bytes, min_bytes=target - 0.05 * int8_bytes, seed=seed
        )
        qm = quantize_with_bits(graph, bits, stats, calib=calib)
        rand.append(score(f"random@<={args.budget:.2f} seed {seed}", qm))

    int8 = rows[0]["top1"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    short = {n: (re.findall(r"model/(conv2d(?:_\d+)?|dense)/", n) or [n])[-1] for n in params}
    lines = [
        f"# Mixed precision, ResNet-8 / CIFAR-10 ({len(ty)} test images, budget {args.budget:.2f} x int8 bytes)",
        "",
        "| model | top-1 | drop vs int8 (points) | weight bytes | x int8 | 4-bit layers |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        four = ", ".join(short[n] for n, b in r["bits"].items() if b == 4) or "-"
        lines.append(
            f"| {r['model']} | {100 * r['top1']:.2f} | {100 * (int8 - r['top1']):+.2f} | "
            f"{r['weight_bytes']:.0f} | {r['size_fraction']:.3f} | {four} |"
        )
    lines.append(
        f"| random (mean of {len(rand)}) | {100 * np.mean([r['top1'] for r in rand]):.2f} | "
        f"{100 * (int8 - np.mean([r['top1'] for r in rand])):+.2f} | | | |"
    )
    lines += [
        "",
        "Sensitivity per layer (4-bit cost; 8-bit in brackets):",
        "",
        "| layer | params | hessian | measured KL |",
        "|---|---|---|---|",
    ]
    for n in params:
        h, m = sens["hessian"].values[n], sens["measured"].values[n]
        lines.append(f"| {short[n]} | {params[n]} | {h[4]:.4g} ({h[8]:.2g}) | {m[4]:.4g} ({m[8]:.2g}) |")
    lines += [
        "",
        f"Timings (s): calibration {t_cal:.1f}; "
        + "; ".join(
            f"{m}: sensitivity {r['sensitivity_seconds']}, ILP {r['ilp_seconds']}, export total {r['export_seconds']}"
            for m, r in mixed_rows.items()
        ),
        "",
    ]
    (out / "bench_mixed.md").write_text("\n".join(lines))
    (out / "bench_mixed.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "sensitivity": {k: v.to_json() for k, v in sens.items()},
                "ties": ties,
                "calibrate_seconds": t_cal,
            },
            indent=1,
        )
    )
    print("\n".join(lines))
    print(f"wrote {out / 'bench_mixed.md'} and {out / 'bench_mixed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
