"""``edgekit sensitivity``: per-layer mixed-precision sensitivities of a float model, and the
``--sensitivity`` choice for ``edgekit export --weight-bits mixed``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgekit.mixed.plan import METHODS


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from edgekit.cli import load_npz
    from edgekit.graph.onnx_import import import_onnx
    from edgekit.mixed.plan import layer_macs, sensitivity
    from edgekit.quant.calibrate import collect

    graph = import_onnx(Path(args.model))
    calib = load_npz(args.calib)["x"]
    stats = collect(graph, calib, observer=args.observer, progress=not args.json)
    sens = sensitivity(graph, calib, stats, args.method)
    macs = layer_macs(graph)
    rows = [
        {
            "layer": n.name,
            "op": n.op,
            "params": int(n.attrs["weight"].size),
            "macs": macs[n.name],
            "sensitivity_4": sens.values[n.name][4],
            "sensitivity_8": sens.values[n.name][8],
        }
        for n in graph.nodes
        if n.name in sens.values
    ]
    if args.json:
        print(json.dumps({"method": sens.method, "seconds": round(sens.seconds, 2), "layers": rows}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{graph.name}: {sens.method} sensitivity ({sens.seconds:.1f} s); lower = safer at 4 bits")
    for col in ("layer", "op", "params", "MACs", "4-bit", "8-bit"):
        t.add_column(col)
    for r in sorted(rows, key=lambda r: r["sensitivity_4"]):
        t.add_row(
            r["layer"][-48:],
            r["op"],
            str(r["params"]),
            str(r["macs"]),
            f"{r['sensitivity_4']:.4g}",
            f"{r['sensitivity_8']:.3g}",
        )
    Console().print(t)
    return 0


def register(subparsers) -> None:
    """Add ``edgekit sensitivity``; ``export --weight-bits mixed`` reads ``--sensitivity`` if present."""
    s = subparsers.add_parser("sensitivity", help="per-layer sensitivity to 4/8-bit weights (mixed precision)")
    s.add_argument("model", help="float ONNX model")
    s.add_argument("--calib", required=True, help="calibration data (.npz with x)")
    s.add_argument("--method", default="hessian", choices=list(METHODS))
    s.add_argument("--observer", default="minmax", choices=["minmax", "percentile", "mse"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sensitivity)
    export = subparsers.choices.get("export")
    if export is not None:
        export.add_argument(
            "--sensitivity", choices=list(METHODS), default=None, help="mixed: layer sensitivity (default hessian)"
        )
        export.add_argument(
            "--latency-target",
            default=None,
            help="mixed: compile target for the per-layer latency table (default host)",
        )
