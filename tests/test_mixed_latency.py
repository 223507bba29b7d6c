"""Per-layer latency tables measured on this host's TVM-compiled kernels: real timings, the
per-target cache (same layer shape measured once), and an ILP under a latency budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.graph.ir import Graph, Node

pytest.importorskip("tvm", reason="latency tables compile layers with TVM (edgekit.compile)")


def two_same_layers() -> Graph:
    rng = np.random.default_rng(0)

    def dense(name, src, dst):
        return Node("dense", name, [src], [dst], {"weight": rng.normal(0, 0.3, (32, 32)).astype(np.float32),
                                                  "bias": rng.normal(0, 0.1, 32).astype(np.float32),
                                                  "activation": (0.0, np.inf)})

    return Graph("two", ["x"], ["z"], [dense("d0", "x", "h"), dense("d1", "h", "z")], input_shapes={"x": [None, 32]})


def test_latency_table_is_measured_cached_and_drives_the_ilp(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    from edgekit.mixed.latency import latency_table, model_overhead
    from edgekit.mixed.plan import plan_mixed
    from edgekit.mixed.sensitivity import measured_sensitivity
    from edgekit.quant.calibrate import collect

    g = two_same_layers()
    x = np.random.default_rng(1).normal(0, 1, (64, 32)).astype(np.float32)
    stats = collect(g, x, progress=False)
    table, info = latency_table(g, stats)
    assert info["measured"] == 2 and info["cache_hits"] == 2  # d1 has d0's shape: measured once per width
    assert set(table) == {"d0", "d1"} and all(set(t) == {4, 8} for t in table.values())
    assert all(0 < v < 50 for t in table.values() for v in t.values())
    assert table["d0"] == table["d1"]
    again, info2 = latency_table(g, stats)
    assert again == table and info2["measured"] == 0
    cache = json.loads(next((tmp_path / "latency").glob("host-*.json")).read_text())
    assert len(cache) == 2
    overhead = model_overhead(g, stats, table)
    assert overhead >= 0
    sens = measured_sensitivity(g, x, stats, max_samples=64)
    fast = min(table["d0"].values())
    budget = overhead + 2 * fast + 1e-9
    _, report = plan_mixed(g, x, max_latency_ms=budget, latency=table, latency_overhead_ms=overhead, stats=stats,
                           sens=sens, tie_residuals=False)
    m = report["mixed"]
    assert m["achieved"]["latency_ms_predicted"] <= budget
    faster = min(table["d0"], key=table["d0"].get)
    assert set(m["bits"].values()) == {faster}
