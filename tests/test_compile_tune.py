"""MetaSchedule tuning: persistent per-target database (reused, resumable), bit-exact tuned
kernels, fallback to untuned kernels on a mismatch, and a clear error when nothing can measure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

tvm = pytest.importorskip("tvm")
pytest.importorskip("xgboost")
from edgekit.compile import build, compile_model, synth  # noqa: E402
from edgekit.compile.tune import TuningError  # noqa: E402

# random schedules, no cost model: the database/reuse/fallback logic without minutes of search
CHEAP = {"search": "replay"}


# The tests tune the plain TE conv (tensorize=False): with the target's dot-product intrinsic every
# kernel of this model is hand-scheduled and MetaSchedule has nothing to tune (last test).
def _tiny(seed: int = 0):
    g = synth.GraphBuilder("tiny", seed=seed)
    x = g.input((1, 12, 12, 8))
    return g.output(g.conv(x, 16, 3, 1))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuning run (1 task, 2 trials) whose database the other tests reuse."""
    d = tmp_path_factory.mktemp("tune")
    r = compile_model(_tiny(), "host", d / "t1.tar", tune=True, trials=2, tuning_dir=d / "db", tune_options=CHEAP,
                      tensorize=False)
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
    r2 = compile_model(_tiny(), "host", d / "t2.tar", tune=True, trials=2, tuning_dir=d / "db", tensorize=False)
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
    r = compile_model(_tiny(), "host", d / "t3.tar", tune=True, trials=2, tuning_dir=d / "db", tensorize=False)
    ex = r.manifest["extra"]
    assert ex["tuned"] is False and "mismatching" in ex["tuning_rejected"]
    assert len(calls) == 2 and ex["verified"]["mismatches"] == 0


def test_cross_target_tuning_needs_a_device(tmp_path):
    with pytest.raises(TuningError, match="--rpc-tracker HOST:PORT --rpc-key KEY"):
        compile_model(_tiny(), "rpi4", tmp_path / "t.tar", tune=True, trials=2, tuning_dir=tmp_path / "db",
                      verify=False, tensorize=False)


def test_hand_scheduled_model_has_nothing_to_tune(tmp_path):
    from edgekit.compile.targets import get_target
    from kernels.tensorize import intrin_for

    if intrin_for(get_target("host").tvm_target()) is None:
        pytest.skip("no dot-product intrinsic on this CPU: the conv is tuned, not hand-scheduled")
    r = compile_model(_tiny(), "host", tmp_path / "t.tar", tune=True, trials=2, tuning_dir=tmp_path / "db")
    ex = r.manifest["extra"]
    assert ex["tuning_tasks"] == 0 and ex["tuning_trials_run"] == 0 and ex["verified"]["mismatches"] == 0
