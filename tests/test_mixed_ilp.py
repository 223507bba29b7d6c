"""ILP bit allocation: optimality, budgets, residual ties, speed on 100 layers, clear errors."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.graph.ir import Graph, Node
from edgekit.mixed.ilp import AllocationError, LayerCost, allocate, residual_ties


def _layers(n: int, seed: int = 0, latency: bool = False) -> list[LayerCost]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        params = int(rng.integers(100, 50_000))
        s8 = float(rng.uniform(0, 0.01))
        lat = {4: float(rng.uniform(0.05, 1.0)), 8: float(rng.uniform(0.05, 1.0))} if latency else None
        out.append(
            LayerCost(
                f"l{i}", params, params * int(rng.integers(16, 1024)), {8: s8, 4: s8 + float(rng.exponential(1.0))}, lat
            )
        )
    return out


def _brute(layers, ok) -> float:
    best = np.inf
    for combo in itertools.product((4, 8), repeat=len(layers)):
        bits = {layer.name: b for layer, b in zip(layers, combo, strict=True)}
        if ok(bits):
            best = min(best, sum(layer.sensitivity[bits[layer.name]] for layer in layers))
    return best


def test_size_budget_is_optimal_against_brute_force():
    layers = _layers(12, seed=1)
    full = sum(layer.size_bytes(8) for layer in layers)
    limit = 0.7 * full
    a = allocate(layers, max_size_bytes=limit)
    assert a.size_bytes <= limit + 1e-6
    best = _brute(layers, lambda bits: sum(la.size_bytes(bits[la.name]) for la in layers) <= limit)
    assert a.objective == pytest.approx(best, rel=1e-9)


def test_bops_and_latency_budgets_together_are_optimal():
    layers = _layers(11, seed=2, latency=True)
    bops8 = sum(la.bops(8) for la in layers)
    lat_limit = 0.8 * sum(max(la.latency_ms.values()) for la in layers) + 0.5
    a = allocate(layers, max_bops=0.75 * bops8, max_latency_ms=lat_limit, latency_overhead_ms=0.5)
    assert a.bops <= 0.75 * bops8 + 1e-6
    assert a.latency_ms is not None and a.latency_ms <= lat_limit + 1e-9

    def ok(bits):
        return (
            sum(la.bops(bits[la.name]) for la in layers) <= 0.75 * bops8
            and 0.5 + sum(la.latency_ms[bits[la.name]] for la in layers) <= lat_limit
        )

    assert a.objective == pytest.approx(_brute(layers, ok), rel=1e-9)


def test_tied_layers_share_one_width():
    layers = _layers(10, seed=3)
    ties = [["l0", "l5"], ["l2", "l3", "l7"]]
    a = allocate(layers, max_size_bytes=0.6 * sum(la.size_bytes(8) for la in layers), ties=ties)
    for tie in ties:
        assert len({a.bits[t] for t in tie}) == 1
    assert a.to_json()["tied_groups"] == ties


def test_hundred_layers_solve_in_under_a_second():
    layers = _layers(100, seed=4, latency=True)
    full = sum(la.size_bytes(8) for la in layers)
    ties = [[f"l{i}", f"l{i + 1}"] for i in range(0, 40, 4)]
    t0 = time.perf_counter()
    a = allocate(layers, max_size_bytes=0.65 * full, max_bops=0.7 * sum(la.bops(8) for la in layers), ties=ties)
    seconds = time.perf_counter() - t0
    assert seconds < 1.0, f"ILP took {seconds:.3f} s for 100 layers"
    assert a.size_bytes <= 0.65 * full + 1e-6
    assert "Optimal" in a.status or "optimal" in a.status.lower()


def test_infeasible_budget_says_what_is_possible():
    layers = _layers(5, seed=5)
    full = sum(la.size_bytes(8) for la in layers)
    with pytest.raises(AllocationError, match="loosen the budget") as e:
        allocate(layers, max_size_bytes=0.4 * full)  # all-int4 is 0.5
    assert isinstance(e.value, EdgekitError)
    with pytest.raises(AllocationError, match="latency table"):
        allocate(layers, max_latency_ms=1.0)
    with pytest.raises(AllocationError, match="not among"):
        allocate(layers, max_size_bytes=full, ties=[["l0", "nope"]])


def _conv(name: str, src: str, dst: str, act: bool = True) -> Node:
    attrs = {
        "weight": np.zeros((4, 1, 1, 4), np.float32),
        "bias": np.zeros(4, np.float32),
        "strides": [1, 1],
        "dilations": [1, 1],
        "pads": [0, 0, 0, 0],
        "groups": 1,
    }
    if act:
        attrs["activation"] = (0.0, np.inf)
    return Node("conv2d", name, [src], [dst], attrs)


def test_residual_ties_follow_adds_through_pass_through_ops():
    g = Graph(
        "r",
        ["x"],
        ["y"],
        [
            _conv("c0", "x", "a"),
            _conv("c1", "a", "b"),
            _conv("c2", "b", "c", act=False),
            Node("add", "add0", ["a", "c"], ["d"], {"activation": (0.0, np.inf)}),  # identity branch: c0 and c2
            _conv("c3", "d", "e"),
            _conv("c4", "d", "f", act=False),
            Node("relu", "r", ["f"], ["f2"]),
            Node("add", "add1", ["e", "f2"], ["g"]),
            _conv("c5", "g", "y"),
        ],
        input_shapes={"x": [None, 4, 4, 4]},
    )
    assert residual_ties(g) == [["c0", "c2"], ["c3", "c4"]]
