"""MetaSchedule tuning: persistent per-target database (reused, resumable), bit-exact tuned
kernels, fallback to untuned kernels on a mismatch, and a clear error when nothing can measure."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

tvm = pytest.importorskip("tvm")
pytest.importorskip("xgboost")
from edgekit.compile import build, compile_model, synth  # noqa: E402
from edgekit.compile.tune import TuningError  # noqa: E402
from tests.device_helpers import free_port, start_module, stop_group, wait_port  # noqa: E402

# random schedules, no cost model: the database/reuse/fallback logic without minutes of search
CHEAP = {"search": "replay"}


# Most tests tune the plain TE conv (tensorize=False, MetaSchedule's generic rules); one tunes the
# tensorized conv over its knobs (test_tensorized_kernels_are_tuned_over_their_knobs).
def _tiny(seed: int = 0):
    g = synth.GraphBuilder("tiny", seed=seed)
    x = g.input((1, 12, 12, 8))
    return g.output(g.conv(x, 16, 3, 1))


def _tune_tiny(out: Path, db: Path, target: str = "host", **kw):
    """Tune the tiny model's plain TE conv for ``target`` with 2 trials into the database ``db``."""
    return compile_model(_tiny(), target, out, tune=True, trials=2, tuning_dir=db, tensorize=False, **kw)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuning run (1 task, 2 trials) whose database the other tests reuse."""
    d = tmp_path_factory.mktemp("tune")
    r = _tune_tiny(d / "t1.tar", d / "db", tune_options=CHEAP)
    return d, r


def test_tune_bit_exact(tuned):
    d, r1 = tuned
    ex1 = r1.manifest["extra"]
    assert ex1["tuned"] is True and ex1["tuning_measured_on"] == "local"
    assert ex1["tuned_kernels"] == 1 and ex1["tuning_trials_run"] >= 1
    assert ex1["verified"]["mismatches"] == 0 and ex1["verified"]["values"] > 0
    assert (d / "db" / "database_tuning_record.json").stat().st_size > 0


def test_second_compile_reuses_the_database(tuned):
    d, r1 = tuned
    r2 = _tune_tiny(d / "t2.tar", d / "db")
    ex2 = r2.manifest["extra"]
    assert ex2["tuning_trials_run"] == 0 and ex2["tuned_kernels"] == 1
    assert ex2["verified"]["mismatches"] == 0 and ex2["tuning_seconds"] < 10


def test_mismatching_tuned_build_falls_back_to_untuned(tuned, monkeypatch):
    d, _ = tuned
    real = build.verify_library
    calls = []

    def flaky(*a, **k):
        res = real(*a, **k)
        calls.append(res)
        if len(calls) == 1:
            res = {**res, "mismatches": 5}
        return res

    monkeypatch.setattr(build, "verify_library", flaky)
    r = _tune_tiny(d / "t3.tar", d / "db")
    ex = r.manifest["extra"]
    assert ex["tuned"] is False and "mismatching" in ex["tuning_rejected"]
    assert len(calls) == 2 and ex["verified"]["mismatches"] == 0


def test_cross_target_tuning_needs_a_device(tmp_path):
    with pytest.raises(TuningError, match="--rpc-tracker HOST:PORT --rpc-key KEY"):
        _tune_tiny(tmp_path / "t.tar", tmp_path / "db", target="rpi4", verify=False)


def test_tensorized_kernels_are_tuned_over_their_knobs(tmp_path):
    """With the target's dot-product intrinsic the conv is edgekit's tensorized kernel; tuning searches
    its knobs (register tile, loop order), keeps a tensorized schedule, stays bit-exact, and a second
    compile with the same budget measures nothing new."""
    from edgekit.compile.targets import get_target
    from kernels.tensorize import intrin_for

    intrin = intrin_for(get_target("host").tvm_target())
    if intrin is None:
        pytest.skip("no dot-product intrinsic on this CPU: the conv is tuned by the generic rules")
    db = tmp_path / "db"
    r = compile_model(_tiny(), "host", tmp_path / "t.tar", tune=True, trials=6, tuning_dir=db)
    ex = r.manifest["extra"]
    assert ex["tuning_tasks"] == 1 and ex["tuned_kernels"] == 1 and ex["tuning_trials_run"] >= 2
    assert ex["verified"]["mismatches"] == 0 and ex["tuning_trials_failed"] == 0
    records = (db / "database_tuning_record.json").read_text()
    assert records.count(intrin) >= ex["tuning_trials_run"]  # every measured candidate is tensorized
    again = compile_model(_tiny(), "host", tmp_path / "t2.tar", tune=True, trials=6, tuning_dir=db)
    assert again.manifest["extra"]["tuning_trials_run"] == 0 and again.manifest["extra"]["tuned_kernels"] == 1


@pytest.fixture(scope="module")
def rpc_tracker(request):
    """A real TVM RPC tracker on 127.0.0.1 with one server registered under the key "ektune"."""
    pytest.importorskip("tornado")
    from tvm import rpc

    tport, sport = free_port(), free_port()
    procs = [
        start_module(
            ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport), "--port-end", str(tport + 1)]
        )
    ]
    request.addfinalizer(lambda: [stop_group(p) for p in reversed(procs)])
    wait_port(tport, timeout=30)
    deadline = time.monotonic() + 30
    procs.append(
        start_module(
            [
                "tvm.exec.rpc_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(sport),
                "--port-end",
                str(sport + 1),
                "--tracker",
                f"127.0.0.1:{tport}",
                "--key",
                "ektune",
            ]
        )
    )
    while True:  # registered with the tracker (its summary lists the key)
        servers = rpc.connect_tracker("127.0.0.1", tport).summary()["server_info"]
        if any(s["key"].endswith(":ektune") for s in servers):
            break
        assert time.monotonic() < deadline, "the RPC server did not register with the tracker"
        time.sleep(0.3)
    return f"127.0.0.1:{tport}"


def test_tune_measures_through_an_rpc_tracker(rpc_tracker, tmp_path, monkeypatch):
    """2 candidates built here, run on the server found through the tracker by its key."""
    from tvm.s_tir.meta_schedule import runner

    def no_local(*_a, **_k):
        raise AssertionError("measured locally, not through RPC")

    monkeypatch.setattr(runner, "LocalRunner", no_local)
    rpc = {"tracker": rpc_tracker, "key": "ektune", "timeout": 30}
    r = _tune_tiny(tmp_path / "t.tar", tmp_path / "db", rpc=rpc, tune_options=CHEAP)
    ex = r.manifest["extra"]
    assert ex["tuned"] is True and ex["tuning_measured_on"] == f"rpc:{rpc_tracker}/ektune"
    assert ex["tuning_trials_run"] >= 1 and ex["tuning_trials_failed"] == 0 and ex["tuned_kernels"] == 1
    assert ex["verified"]["mismatches"] == 0 and ex["verified"]["values"] > 0
    lines = (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()
    run_secs = [json.loads(line)[1][1] for line in lines if line.strip()]
    assert len(run_secs) == ex["tuning_trials_run"]
    assert all(secs and 0 < min(secs) < 1 for secs in run_secs)  # measured times, not failures (1e10)


def test_knob_search_measures_through_an_rpc_tracker(rpc_tracker, tmp_path, monkeypatch):
    """The default (tensorized) path tunes its knobs on the device too: candidates built here, each
    measured on the server behind the tracker, the result bit-exact."""
    from tvm.s_tir.meta_schedule import runner

    from edgekit.compile.targets import get_target
    from kernels.tensorize import intrin_for

    if intrin_for(get_target("host").tvm_target()) is None:
        pytest.skip("no dot-product intrinsic on this CPU: no knob space to search")

    def no_local(*_a, **_k):
        raise AssertionError("measured locally, not through RPC")

    monkeypatch.setattr(runner, "LocalRunner", no_local)
    rpc = {"tracker": rpc_tracker, "key": "ektune", "timeout": 30}
    r = compile_model(_tiny(), "host", tmp_path / "t.tar", tune=True, trials=3, tuning_dir=tmp_path / "db", rpc=rpc)
    ex = r.manifest["extra"]
    assert ex["tuning_measured_on"] == f"rpc:{rpc_tracker}/ektune" and ex["tuned_kernels"] == 1
    assert ex["tuning_trials_run"] >= 2 and ex["tuning_trials_failed"] == 0
    assert ex["verified"]["mismatches"] == 0


def test_unreachable_rpc_tracker_or_unknown_key_is_a_clear_error(rpc_tracker, tmp_path):
    for rpc, msg in [
        (
            {"tracker": f"127.0.0.1:{free_port()}", "key": "ektune", "timeout": 5},
            "cannot reach the TVM RPC tracker at 127.0.0.1:",
        ),
        (
            {"tracker": rpc_tracker, "key": "nosuchdevice", "timeout": 5},
            "no TVM RPC server registered with key 'nosuchdevice'.*registered keys: ektune",
        ),
    ]:
        t0 = time.monotonic()
        with pytest.raises(TuningError, match=msg):
            _tune_tiny(tmp_path / "t.tar", tmp_path / "db", rpc=rpc, tune_options=CHEAP)
        assert time.monotonic() - t0 < 20
