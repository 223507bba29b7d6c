"""The mixed-precision pipeline: calibrate once, sensitivities, (latency table), ILP, quantize."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.graph.float_exec import infer_shapes
from edgekit.graph.ir import Graph
from edgekit.mixed.ilp import Allocation, LayerCost, allocate, residual_ties
from edgekit.mixed.sensitivity import Sensitivity, hessian_sensitivity, measured_sensitivity
from edgekit.mixed.torch_graph import weighted_layers
from edgekit.qmodel import QuantModel
from edgekit.quant.calibrate import TensorStats, collect
from edgekit.quant.dyadic import quantize_graph

METHODS = ("hessian", "measured")


def layer_macs(graph: Graph) -> dict[str, int]:
    """MACs per conv/dense layer for one sample (as the quantizer counts them)."""
    shapes = infer_shapes(graph)
    out: dict[str, int] = {}
    for n in weighted_layers(graph):
        w = n.attrs["weight"]
        o = shapes[n.outputs[0]]
        out[n.name] = int(np.prod(o[1:-1], dtype=np.int64) * w.size) if w.ndim == 4 else int(np.prod(o[:-1]) * w.size)
    return out


def layer_costs(graph: Graph, sens: Sensitivity, latency: dict[str, dict[int, float]] | None = None) -> list[LayerCost]:
    macs = layer_macs(graph)
    return [
        LayerCost(
            n.name,
            int(np.asarray(n.attrs["weight"]).size),
            macs[n.name],
            sens.values[n.name],
            None if latency is None else latency[n.name],
        )
        for n in weighted_layers(graph)
    ]


def int8_totals(costs: list[LayerCost]) -> dict[str, float]:
    return {"size_bytes": sum(c.size_bytes(8) for c in costs), "bops": sum(c.bops(8) for c in costs)}


def sensitivity(
    graph: Graph, calib_x: Any, stats: dict[str, TensorStats], method: str = "hessian", **kw: Any
) -> Sensitivity:
    if method == "hessian":
        return hessian_sensitivity(graph, calib_x, **kw)
    if method == "measured":
        return measured_sensitivity(graph, calib_x, stats, **kw)
    raise EdgekitError(f"unknown sensitivity method {method!r}: choose one of {METHODS}")


def quantize_with_bits(
    graph: Graph,
    bits: dict[str, int],
    stats: dict[str, TensorStats],
    observer: str = "minmax",
    calib: Any = None,
    bias_correction: Any = None,
) -> QuantModel:
    """Quantize with per-layer widths (unlisted layers: 8), reusing ``stats``; ``calib`` is passed on
    for the quantizer's data-driven steps (e.g. empirical bias correction)."""
    return quantize_graph(
        graph,
        calib,
        weight_bits={"*": 8, **bits},
        observer=observer,
        stats=stats,
        progress=False,
        bias_correction=bias_correction,
    )


def plan_mixed(
    graph: Graph,
    calib_x: Any,
    *,
    max_size: float | None = None,
    max_bops: float | None = None,
    max_latency_ms: float | None = None,
    latency: dict[str, dict[int, float]] | None = None,
    latency_overhead_ms: float = 0.0,
    method: str = "hessian",
    observer: str = "minmax",
    stats: dict[str, TensorStats] | None = None,
    sens: Sensitivity | None = None,
    tie_residuals: bool = True,
) -> tuple[QuantModel, dict[str, Any]]:
    """Choose 4/8-bit weights per layer under the budgets and quantize.

    ``max_size`` and ``max_bops`` are fractions of the all-int8 model; ``max_latency_ms`` is
    absolute and needs ``latency`` ({layer: {bits: ms}}), from ``edgekit.mixed.latency``.
    """
    if max_size is None and max_bops is None and max_latency_ms is None:
        raise EdgekitError(
            "mixed precision needs a budget: --max-size FRACTION, --max-bops FRACTION "
            "or --max-latency-ms MS (with --device URL or the host's compiled kernels)"
        )
    for label, v in (("--max-size", max_size), ("--max-bops", max_bops)):
        if v is not None and not 0 < v <= 1.0:
            raise EdgekitError(f"{label} is a fraction of the int8 model in (0, 1], got {v}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if stats is None:
        stats = collect(graph, calib_x, observer=observer, progress=False)
        timings["calibrate_s"] = time.perf_counter() - t0
    if sens is None:
        sens = sensitivity(graph, calib_x, stats, method)
    timings["sensitivity_s"] = sens.seconds
    costs = layer_costs(graph, sens, latency)
    full = int8_totals(costs)
    ties = residual_ties(graph) if tie_residuals else []
    alloc: Allocation = allocate(
        costs,
        max_size_bytes=None if max_size is None else max_size * full["size_bytes"],
        max_bops=None if max_bops is None else max_bops * full["bops"],
        max_latency_ms=max_latency_ms,
        latency_overhead_ms=latency_overhead_ms,
        ties=ties,
    )
    timings["ilp_s"] = alloc.seconds
    t1 = time.perf_counter()
    qm = quantize_with_bits(graph, alloc.bits, stats, observer, calib=calib_x)
    timings["quantize_s"] = time.perf_counter() - t1
    report: dict[str, Any] = {
        "mixed": {
            "bits": alloc.bits,
            "budget": {
                "max_size_fraction": max_size,
                "max_bops_fraction": max_bops,
                "max_latency_ms": max_latency_ms,
                "int8_size_bytes": full["size_bytes"],
                "int8_bops": full["bops"],
            },
            "achieved": {
                "size_bytes": alloc.size_bytes,
                "size_fraction": alloc.size_bytes / full["size_bytes"],
                "bops": alloc.bops,
                "bops_fraction": alloc.bops / full["bops"],
                "latency_ms_predicted": alloc.latency_ms,
            },
            "sensitivity": sens.to_json(),
            "ilp": alloc.to_json(),
            "latency_table_ms": latency,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
    }
    qm.provenance.setdefault("options", {})["mixed"] = {"method": sens.method, "budget": report["mixed"]["budget"]}
    return qm, report


def random_allocation(
    params: dict[str, int],
    ties: list[list[str]],
    *,
    max_bytes: float,
    min_bytes: float = 0.0,
    seed: int = 0,
    tries: int = 100_000,
) -> dict[str, int]:
    """A random 4/8-bit allocation (tied groups move together) whose weight bytes lie in
    [min_bytes, max_bytes]: the baseline a sensitivity-driven allocation has to beat."""
    tied = {name for g in ties for name in g}
    groups = [list(g) for g in ties] + [[n] for n in params if n not in tied]
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        pick = rng.integers(0, 2, len(groups))
        bits = {n: (4 if p else 8) for g, p in zip(groups, pick, strict=True) for n in g}
        size = sum(params[n] * b / 8 for n, b in bits.items())
        if min_bytes <= size <= max_bytes:
            return bits
    raise EdgekitError(f"no random allocation found with weight bytes in [{min_bytes:.0f}, {max_bytes:.0f}]")
