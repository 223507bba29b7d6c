"""Per-layer latency tables measured on this host's TVM-compiled kernels: real timings, the
per-target cache (same layer shape measured once), and an ILP under a latency budget."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgekit.graph.ir import Graph, Node


def two_same_layers() -> Graph:
    rng = np.random.default_rng(0)

    def dense(name, src, dst):
        return Node(
            "dense",
            name,
            [src],
            [dst],
            {
                "weight": rng.normal(0, 0.3, (32, 32)).astype(np.float32),
                "bias": rng.normal(0, 0.1, 32).astype(np.float32),
                "activation": (0.0, np.inf),
            },
        )

    return Graph("two", ["x"], ["z"], [dense("d0", "x", "h"), dense("d1", "h", "z")], input_shapes={"x": [None, 32]})


def test_table_cache_and_latency_budget_with_a_stand_in_timer(tmp_path, monkeypatch):
    """The table/cache/ILP logic, with the TVM build and timer replaced by a fake (fast)."""
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    import edgekit.mixed.latency as lat
    from edgekit.mixed.plan import plan_mixed
    from edgekit.mixed.sensitivity import measured_sensitivity
    from edgekit.quant.calibrate import collect

    calls = []

    def fake_measure(qm, target="host", device=None, **kw):
        calls.append((target, device))
        bits = [n.attrs["weight_bits"] for n in qm.nodes if "weight" in n.params]
        return 0.5 if bits == [8] else 0.8 if bits == [4] else 2.5

    monkeypatch.setattr(lat, "measure", fake_measure)
    g = two_same_layers()
    x = np.random.default_rng(1).normal(0, 1, (64, 32)).astype(np.float32)
    stats = collect(g, x, progress=False)
    table, info = lat.latency_table(g, stats, target="rpi4", device="ssh://pi@example")
    assert table == {"d0": {4: 0.8, 8: 0.5}, "d1": {4: 0.8, 8: 0.5}}
    assert info["measured"] == 2 and info["cache_hits"] == 2 and calls == [("rpi4", "ssh://pi@example")] * 2
    assert lat.latency_table(g, stats, target="rpi4", device="ssh://pi@example")[1]["measured"] == 0
    assert lat.latency_table(g, stats, target="host")[1]["measured"] == 2  # another target, another cache
    assert lat.model_overhead(g, stats, table, target="host") == pytest.approx(1.5)
    sens = measured_sensitivity(g, x, stats, max_samples=64)
    _, report = plan_mixed(
        g, x, max_latency_ms=2.5, latency=table, latency_overhead_ms=1.5, stats=stats, sens=sens, tie_residuals=False
    )
    assert set(report["mixed"]["bits"].values()) == {8}
    assert report["mixed"]["achieved"]["latency_ms_predicted"] == pytest.approx(2.5)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("EDGEKIT_TEST_LATENCY") != "1",
    reason="real TVM builds take 30-300 s per layer on the shared 2-core machine (measured 909 s "
    "for this test under load); set EDGEKIT_TEST_LATENCY=1 to run it",
)
def test_latency_table_is_measured_cached_and_drives_the_ilp(tmp_path, monkeypatch):
    pytest.importorskip("tvm", reason="latency tables compile layers with TVM (edgekit.compile)")
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
    # The whole-model time is one more TVM build: stand it in here (the table above is real).
    import edgekit.mixed.latency as lat

    monkeypatch.setattr(
        lat, "model_latency", lambda qm, target="host", device=None: 1.0 + sum(t[8] for t in table.values())
    )
    overhead = model_overhead(g, stats, table)
    assert overhead == pytest.approx(1.0)
    assert len(json.loads(next((tmp_path / "latency").glob("host-*.json")).read_text())) == 3  # + the model
    sens = measured_sensitivity(g, x, stats, max_samples=64)
    fast = min(table["d0"].values())
    budget = overhead + 2 * fast + 1e-9
    _, report = plan_mixed(
        g,
        x,
        max_latency_ms=budget,
        latency=table,
        latency_overhead_ms=overhead,
        stats=stats,
        sens=sens,
        tie_residuals=False,
    )
    m = report["mixed"]
    assert m["achieved"]["latency_ms_predicted"] <= budget
    faster = min(table["d0"], key=table["d0"].get)
    assert set(m["bits"].values()) == {faster}
