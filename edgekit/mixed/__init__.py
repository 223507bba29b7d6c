"""Mixed 4/8-bit weight precision (HAWQ-V3): layer sensitivity, ILP bit allocation under weight
size, BOPs and measured-latency budgets. ``export_mixed`` is what ``edgekit export
--weight-bits mixed`` calls; ``plan_mixed`` is the Python entry point on a float IR graph."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.mixed.ilp import Allocation, AllocationError, LayerCost, allocate, residual_ties
from edgekit.mixed.plan import METHODS, plan_mixed
from edgekit.qmodel import QuantModel

DEFAULT_METHOD = "hessian"

__all__ = [
    "export_mixed",
    "plan_mixed",
    "allocate",
    "residual_ties",
    "LayerCost",
    "Allocation",
    "AllocationError",
    "METHODS",
    "DEFAULT_METHOD",
]


def _load_graph(model_path: str | Path):
    path = Path(model_path)
    if path.suffix.lower() != ".onnx":
        raise EdgekitError(f"{path}: mixed precision starts from a float ONNX model (.onnx)")
    if not path.exists():
        raise EdgekitError(f"{path}: no such model file")
    from edgekit.graph.onnx_import import import_onnx

    return import_onnx(path)


def _say(args: argparse.Namespace):
    import sys

    quiet = bool(getattr(args, "json", False))
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def export_mixed(
    model_path: str | Path, calib_x: np.ndarray, args: argparse.Namespace
) -> tuple[QuantModel, dict[str, Any]]:
    """Quantize with per-layer 4/8-bit weights chosen by the ILP under the budgets in ``args``
    (max_size / max_bops: fractions of int8; max_latency_ms with device or the host's kernels)."""
    from edgekit.quant.calibrate import collect

    t0 = time.perf_counter()
    say = _say(args)
    graph = _load_graph(model_path)
    observer = getattr(args, "observer", None) or "minmax"
    method = getattr(args, "sensitivity", None) or DEFAULT_METHOD
    max_size, max_bops = getattr(args, "max_size", None), getattr(args, "max_bops", None)
    max_lat, device = getattr(args, "max_latency_ms", None), getattr(args, "device", None)
    if max_size is None and max_bops is None and max_lat is None:
        raise EdgekitError(
            "--weight-bits mixed needs a budget: --max-size 0.65 (fraction of the int8 weight bytes), "
            "--max-bops FRACTION, or --max-latency-ms MS [--device URL]"
        )
    if device and max_lat is None:
        raise EdgekitError("--device is used to measure latency: give --max-latency-ms too")
    say("calibrating")
    stats = collect(graph, calib_x, observer=observer, progress=False)
    t_cal = time.perf_counter() - t0
    latency = None
    overhead = 0.0
    lat_info: dict[str, Any] = {}
    if max_lat is not None:
        from edgekit.mixed.latency import latency_table, model_overhead

        target = getattr(args, "latency_target", None) or "host"
        say(f"latency table on {device or 'this host'} (target {target}; cached per target)")
        latency, lat_info = latency_table(graph, stats, target=target, device=device, progress=say)
        overhead = model_overhead(graph, stats, latency, target=target, device=device)
        lat_info["overhead_ms"] = overhead
    say(f"{method} sensitivity")
    qm, report = plan_mixed(
        graph,
        calib_x,
        max_size=max_size,
        max_bops=max_bops,
        max_latency_ms=max_lat,
        latency=latency,
        latency_overhead_ms=overhead,
        method=method,
        observer=observer,
        stats=stats,
    )
    mixed = report["mixed"]
    mixed["timings_s"]["calibrate_s"] = round(t_cal, 3)
    if latency is not None:
        from edgekit.mixed.latency import cached_model_latency

        target = lat_info["target"]
        mixed["achieved"]["latency_ms_measured"] = cached_model_latency(qm, target=target, device=device)
        mixed["latency"] = lat_info
    mixed["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
    n4 = sum(1 for b in mixed["bits"].values() if b == 4)
    frac = mixed["achieved"]["size_fraction"]
    say(f"{n4}/{len(mixed['bits'])} layers at 4 bits, {frac:.3f} of the int8 weight bytes")
    return qm, report
