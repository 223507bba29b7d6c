"""Bit allocation as an integer linear program (HAWQ-V3), solved by scipy's ``milp`` (HiGHS).

One binary variable per (group of tied layers, bit width); exactly one width per group;
minimise the summed sensitivity subject to any of: weight bytes <= S, BOPs <= B,
latency <= L. Layers whose outputs meet at an Add (residual branches) form one group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.graph.ir import Graph


class AllocationError(EdgekitError):
    """No bit allocation satisfies the budget (or the problem is malformed)."""


@dataclass
class LayerCost:
    """What the ILP knows about one layer: weights, MACs, sensitivity and latency per bit width."""

    name: str
    params: int
    macs: int
    sensitivity: dict[int, float]
    latency_ms: dict[int, float] | None = None

    def size_bytes(self, bits: int) -> float:
        return self.params * bits / 8

    def bops(self, bits: int, act_bits: int = 8) -> float:
        return float(self.macs) * bits * act_bits


@dataclass
class Allocation:
    bits: dict[str, int]
    objective: float
    size_bytes: float
    bops: float
    latency_ms: float | None
    seconds: float
    status: str
    groups: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "objective": self.objective,
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "latency_ms": self.latency_ms,
            "solve_seconds": round(self.seconds, 4),
            "status": self.status,
            "tied_groups": [g for g in self.groups if len(g) > 1],
        }


def residual_ties(graph: Graph) -> list[list[str]]:
    """Groups of conv/dense layers that must share a width: those feeding the same Add (through
    pass-through ops such as relu, pooling, reshape), merged transitively."""
    producer = graph.producer()
    passthrough = {"relu", "clip", "maxpool", "avgpool", "reshape", "transpose", "pad"}

    def source_layer(tensor: str) -> str | None:
        node = producer.get(tensor)
        while node is not None and node.op in passthrough:
            node = producer.get(node.inputs[0])
        return node.name if node is not None and node.op in ("conv2d", "dense") else None

    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for n in graph.nodes:
        if n.op == "add":
            layers = [s for s in (source_layer(t) for t in n.inputs) if s is not None]
            for other in layers[1:]:
                parent[find(other)] = find(layers[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted((sorted(g, key=order.__getitem__) for g in groups.values() if len(g) > 1), key=lambda g: order[g[0]])


def _groups(layers: list[LayerCost], ties: list[list[str]] | None) -> list[list[int]]:
    index = {layer.name: i for i, layer in enumerate(layers)}
    seen: set[int] = set()
    groups: list[list[int]] = []
    for tie in ties or []:
        unknown = [t for t in tie if t not in index]
        if unknown:
            raise AllocationError(f"tied layer(s) {unknown} are not among the layers being allocated")
        g = [index[t] for t in tie if index[t] not in seen]
        seen.update(g)
        if g:
            groups.append(g)
    groups += [[i] for i in range(len(layers)) if i not in seen]
    return groups


def allocate(
    layers: list[LayerCost],
    *,
    bits: tuple[int, ...] = (4, 8),
    max_size_bytes: float | None = None,
    max_bops: float | None = None,
    max_latency_ms: float | None = None,
    latency_overhead_ms: float = 0.0,
    ties: list[list[str]] | None = None,
    time_limit: float = 30.0,
) -> Allocation:
    """Solve the ILP; returns the chosen bits per layer with the achieved size, BOPs and latency."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not layers:
        raise AllocationError("no conv/dense layers to allocate bits to")
    if max_latency_ms is not None and any(layer.latency_ms is None for layer in layers):
        raise AllocationError("a latency budget needs a latency table for every layer (see edgekit.mixed.latency)")
    t0 = time.perf_counter()
    groups = _groups(layers, ties)
    nb = len(bits)
    nvar = len(groups) * nb

    def per_var(fn) -> np.ndarray:
        v = np.zeros(nvar)
        for gi, g in enumerate(groups):
            for bi, b in enumerate(bits):
                v[gi * nb + bi] = sum(fn(layers[i], b) for i in g)
        return v

    cost = per_var(lambda layer, b: layer.sensitivity[b])
    rows, lo, hi = [], [], []
    for gi in range(len(groups)):  # exactly one width per group
        r = np.zeros(nvar)
        r[gi * nb : (gi + 1) * nb] = 1
        rows.append(r)
        lo.append(1)
        hi.append(1)
    budgets = []
    if max_size_bytes is not None:
        budgets.append(("size", per_var(lambda layer, b: layer.size_bytes(b)), max_size_bytes))
    if max_bops is not None:
        budgets.append(("bops", per_var(lambda layer, b: layer.bops(b)), max_bops))
    if max_latency_ms is not None:
        budgets.append(
            (
                "latency",
                per_var(lambda layer, b: layer.latency_ms[b]),  # type: ignore[index]
                max_latency_ms - latency_overhead_ms,
            )
        )
    for _, row, limit in budgets:
        rows.append(row)
        lo.append(-np.inf)
        hi.append(limit)
    res = milp(
        cost,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.ones(nvar),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit},
    )
    seconds = time.perf_counter() - t0
    if res.x is None:
        smallest = {name: float(row.reshape(len(groups), nb).min(axis=1).sum()) for name, row, _ in budgets}
        wanted = {name: float(limit) for name, _, limit in budgets}
        raise AllocationError(
            f"no allocation of {list(bits)}-bit weights meets the budget ({res.message}); the least each "
            f"quantity can be is {smallest} against the limits {wanted}: loosen the budget"
        )
    x = np.round(res.x).reshape(len(groups), nb)
    chosen: dict[str, int] = {}
    for gi, g in enumerate(groups):
        b = bits[int(np.argmax(x[gi]))]
        for i in g:
            chosen[layers[i].name] = b
    lat = None
    if all(layer.latency_ms is not None for layer in layers):
        lat = latency_overhead_ms + sum(layer.latency_ms[chosen[layer.name]] for layer in layers)  # type: ignore[index]
    return Allocation(
        bits=chosen,
        objective=float(sum(layer.sensitivity[chosen[layer.name]] for layer in layers)),
        size_bytes=float(sum(layer.size_bytes(chosen[layer.name]) for layer in layers)),
        bops=float(sum(layer.bops(chosen[layer.name]) for layer in layers)),
        latency_ms=lat,
        seconds=seconds,
        status=str(res.message),
        groups=[[layers[i].name for i in g] for g in groups],
    )
