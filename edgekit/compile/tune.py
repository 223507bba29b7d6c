"""MetaSchedule auto-tuning with a persistent database per target.

``~/.cache/edgekit/tuning/<target>`` (JSON database) is reused across compiles: tasks (one per
distinct kernel shape; weights are arguments, so equal layers of different models share them)
that already hold enough records are not tuned again, so a second compile is fast and an
interrupted run resumes where it stopped. Measurements run locally (host targets) or on a
device through a TVM RPC tracker; builds or runs that crash or time out are recorded as failed
and skipped.

Two kinds of task. edgekit's own tensorized kernels (conv, dense/GEMM, depthwise) are searched over
their knobs (register tile shape, loop order; ``kernels.space.design_space``), so a tuned kernel is
one of edgekit's schedules with the knobs that measured fastest on the target. Kernels without a
hand schedule (``tensorize=False``) get MetaSchedule's generic rules (no auto-tensorization: on
plain weight layouts its tensorized kernels were measured wrong). The caller checks bit-exactness
of the tuned build and falls back to the untuned kernels on any mismatch.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

from .emulate import CACHE
from .lower import Lowered
from .targets import TargetSpec

TUNING_ROOT = CACHE / "tuning"


class TuningError(EdgekitError):
    """Tuning cannot run as asked (no way to measure, bad RPC address...)."""


def tuning_dir_for(spec: TargetSpec, tuning_dir: str | Path | None = None) -> Path:
    return Path(tuning_dir) if tuning_dir else TUNING_ROOT / spec.name


def _export_so(mod) -> str:
    """MetaSchedule builder export: a shared library linked by $EDGEKIT_MS_CC (a cross compiler)."""
    from tvm.support import cc as tcc

    path = os.path.join(tempfile.mkdtemp(prefix="edgekit-ms-"), "tuned.so")
    mod.export_library(path, fcompile=tcc.cross_compiler(os.environ["EDGEKIT_MS_CC"]))
    return path


def _in_process_builder(cross_cc: str | None):
    """A MetaSchedule builder that compiles candidates in this process.

    TVM's LocalBuilder starts a fresh worker pool for every batch, and the first build in a new
    process costs about a minute here (one-time initialisation), against ~0.1 s per candidate in
    a warm process. Build errors are reported per candidate (and skipped by the tuner)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder as lb

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            out = []
            for bi in build_inputs:
                try:
                    rt = lb.default_build(bi.mod, bi.target, None)
                    if cross_cc:
                        os.environ["EDGEKIT_MS_CC"] = cross_cc
                        path = _export_so(rt)
                    else:
                        path = lb.default_export(rt)
                    out.append(ms.builder.BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate is skipped, not fatal
                    out.append(ms.builder.BuilderResult(None, f"build failed: {exc}"[:2000]))
            return out

    return InProcessBuilder()


def _tagged_kernel(task):
    """The kernel of an extracted task that carries an edgekit schedule kind, or None."""
    from kernels import space as kspace

    return next((f for f in task.dispatched[0].functions.values() if kspace.kind_and_intrin(f)[0]), None)


def _task_kind(task) -> str | None:
    """The schedule kind of an extracted task's kernel (None: no hand schedule)."""
    from kernels import space as kspace

    f = _tagged_kernel(task)
    return None if f is None else kspace.kind_and_intrin(f)[0]


def _space_size(task) -> int:
    """Candidates a knob task can offer (unbounded for MetaSchedule's generic rules)."""
    from kernels import space as kspace

    f = _tagged_kernel(task)
    return 1 << 30 if f is None else kspace.space_size(f)


def _is_scheduled(f) -> bool:
    return f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))


def _drop_unbuildable(mod, fallback, tuned: list, target, say) -> tuple[object, list[str]]:
    """Compile every tuned kernel alone; one that fails (a TVM codegen bug for that schedule)
    goes back to its untuned form (from ``fallback``) instead of failing the whole model."""
    import tvm

    dropped = []
    for gv in tuned:
        try:
            tvm.compile(tvm.IRModule({"main": mod[gv].with_attr("global_symbol", "main")}), target)
        except Exception as exc:  # noqa: BLE001 - TVM raises many error types here
            mod[gv] = fallback[gv]
            dropped.append(gv.name_hint)
            say(
                f"tuned schedule of {gv.name_hint} does not build ({str(exc).splitlines()[0][:80]}); "
                "using the untuned kernel"
            )
    return mod, dropped


def _database(work: Path):
    from tvm.s_tir import meta_schedule as ms

    work.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(work / "database_workload.json"), path_tuning_record=str(work / "database_tuning_record.json")
    )


def _records(db, mod, k: int) -> list:
    if not db.has_workload(mod):
        return []
    return list(db.get_top_k(db.commit_workload(mod), k))


def _check_tracker(cfg) -> None:
    """Fail fast, in bounded time, when the tracker is unreachable or has no server with the key.

    Without this MetaSchedule's RPCRunner lets every candidate wait out its session timeout (the
    tracker queues a request for a key no server has) and records it as a failed run: tuning
    "succeeds" after minutes with nothing measured."""
    import socket
    import threading

    where = f"{cfg.tracker_host}:{cfg.tracker_port}"
    wait = max(1.0, min(float(cfg.session_timeout_sec), 10.0))
    try:
        socket.create_connection((cfg.tracker_host, cfg.tracker_port), timeout=wait).close()
    except OSError as exc:
        raise TuningError(
            f"cannot reach the TVM RPC tracker at {where} ({exc}); start one with `python -m tvm.exec.rpc_tracker "
            f"--port {cfg.tracker_port}` and register the device's server with `python -m tvm.exec.rpc_server "
            f"--tracker {where} --key {cfg.tracker_key}`"
        ) from None
    found: dict[str, Any] = {}

    def query() -> None:
        try:
            found["servers"] = cfg.connect_tracker().summary()["server_info"]
        except Exception as exc:  # noqa: BLE001 - TVM raises many error types; reported below
            found["error"] = exc

    t = threading.Thread(target=query, daemon=True)  # summary() has no timeout of its own
    t.start()
    t.join(wait)
    if "servers" not in found:
        why = found.get("error") or f"no answer within {wait:g} s"
        raise TuningError(f"{where} does not answer as a TVM RPC tracker ({str(why).splitlines()[0][:200]})")
    keys = sorted({str(s.get("key", "")).split(":", 1)[-1] for s in found["servers"]})
    if cfg.tracker_key not in keys:
        raise TuningError(
            f"no TVM RPC server registered with key {cfg.tracker_key!r} at the tracker {where} "
            f"(registered keys: {', '.join(keys) or 'none'}); start one on the device with `python -m "
            f"tvm.exec.rpc_server --tracker {where} --key {cfg.tracker_key}`"
        )


def _runner(spec: TargetSpec, rpc: dict[str, Any] | None):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if rpc:
        host, _, port = str(rpc.get("tracker", "")).rpartition(":")
        if not host or not port.isdigit() or not rpc.get("key"):
            raise TuningError("RPC tuning needs --rpc-tracker HOST:PORT and --rpc-key KEY")
        cfg = ms.runner.RPCConfig(
            tracker_host=host,
            tracker_port=int(port),
            tracker_key=str(rpc["key"]),
            session_timeout_sec=int(rpc.get("timeout", 60)),
        )
        _check_tracker(cfg)
        return ms.runner.RPCRunner(cfg, evaluator_config=evaluator, max_workers=1)
    if spec.arch != platform.machine():
        raise TuningError(
            f"tuning for {spec.name} must measure on a {spec.arch} device: start a TVM RPC server on it "
            f"registered with a tracker and pass --rpc-tracker HOST:PORT --rpc-key KEY "
            f"(or compile without --tune)"
        )
    # measure with the thread count the artifact will run with; unset, every parallel kernel launch also
    # pays a read of /sys/devices/system/cpu/online (see device.runtimes.base.default_threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, min(spec.threads or 1, os.cpu_count() or 1))))
    return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=30)


def _progress_callback(names: list[str], say: Callable[[str], None], budget: dict[str, int]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    state = {n: [0, math.inf, 0] for n in names}  # measured, best seconds, failed

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            name = names[task_id]
            st = state[name]
            for b, r in zip(builder_results, runner_results, strict=False):
                st[0] += 1
                secs = [float(s) for s in (r.run_secs or [])]
                if b.error_msg or r.error_msg or not secs:
                    st[2] += 1
                else:
                    st[1] = min(st[1], sum(secs) / len(secs))
            best = f"{st[1] * 1e6:.1f} us" if st[1] < math.inf else "-"
            done = sum(v[0] for v in state.values())
            say(
                f"tuning {name}: {st[0]}/{budget.get(name, '?')} trials, best {best}, "
                f"{st[2]} failed (skipped); {done} trials this run"
            )

    return Progress(), state


def tune_module(
    lowered: Lowered,
    spec: TargetSpec,
    *,
    trials: int = 64,
    tuning_dir: str | Path | None = None,
    rpc: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    trials_per_iter: int = 16,
    tune_elementwise: bool = False,
    verbose: bool = False,
    search: str = "evolutionary",
):
    """Tune ``lowered.mod`` for ``spec``; returns (module with the database's best schedules applied, info)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    say = progress or (lambda _m: None)
    t0 = time.time()
    if not verbose:  # MetaSchedule's per-round tables go to its log files, not the terminal
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    target = spec.tvm_target()
    work = tuning_dir_for(spec, tuning_dir)
    db = _database(work)
    from kernels import space as kspace

    start = lowered.unscheduled if lowered.unscheduled is not None else lowered.mod
    tasks = ms.relax_integration.extract_tasks(start, target)
    knob_tasks = [t for t in tasks if _task_kind(t) in kspace.TUNABLE]
    generic = [t for t in tasks if _task_kind(t) is None]  # the other kinds keep their one hand schedule
    if not tune_elementwise:  # the reductions (conv, dense, pools) are where the time goes
        generic = [t for t in generic if any(f in t.task_name for f in ("conv2d", "depthwise", "dense", "pool"))]
    tasks = knob_tasks + generic
    per_task = max(1, math.ceil(trials / max(len(tasks), 1)))
    want = {t.task_name: min(per_task, _space_size(t)) for t in tasks}  # a knob space may be smaller
    pending = [t for t in tasks if len(_records(db, t.dispatched[0], per_task)) < want[t.task_name]]
    say(
        f"tuning database {work}: {len(tasks)} task(s), {len(tasks) - len(pending)} already tuned, "
        f"{len(pending)} to tune with {per_task} trials each"
    )
    ran = failed = 0
    if pending:
        runner = _runner(spec, rpc)
        builder = _in_process_builder(spec.compiler() if spec.cross else None)
        generic_space = ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs="llvm")
        knob_space = ms.space_generator.ScheduleFn(kspace.design_space, sch_rules=[], postprocs=[], mutator_probs={})
        pop = int(min(512, max(32, 8 * per_task)))  # small budgets: a small, fast evolutionary search
        if search == "evolutionary":
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=pop, init_min_unmeasured=min(50, pop // 2), genetic_num_iters=4 if pop >= 256 else 2
            )
            cost_model = "xgb"
        else:  # "replay": random schedules from the design space, no cost model (cheap; for smoke tests)
            strategy, cost_model = "replay-trace", "random"
        with tempfile.TemporaryDirectory(prefix="edgekit-ms-logs-") as logs:
            ctxs, weights = [], []
            for group, space in (
                ([t for t in pending if t in knob_tasks], knob_space),
                ([t for t in pending if t not in knob_tasks], generic_space),
            ):
                if group:
                    c, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
                        group, work_dir=logs, space=space, strategy=strategy, num_threads=os.cpu_count() or 1, seed=0
                    )
                    ctxs += c
                    weights += w
            names = [c.task_name for c in ctxs]
            remaining = {c.task_name: want[c.task_name] - len(_records(db, c.mod, per_task)) for c in ctxs}
            cb, state = _progress_callback(names, say, remaining)
            callbacks = [*ms.measure_callback.MeasureCallback.create("default"), cb]
            try:
                ms.tune.tune_tasks(
                    tasks=ctxs,
                    task_weights=weights,
                    work_dir=logs,
                    max_trials_global=sum(remaining.values()),
                    max_trials_per_task=max(remaining.values()),
                    num_trials_per_iter=min(trials_per_iter, max(remaining.values())),
                    builder=builder,
                    runner=runner,
                    database=db,
                    measure_callbacks=callbacks,
                    task_scheduler="round-robin",
                    cost_model=cost_model,
                )
            except KeyboardInterrupt:
                say(f"tuning interrupted: measured records are kept in {work}; run again to resume")
                raise
            ran = sum(v[0] for v in state.values())
            failed = sum(v[2] for v in state.values())
    with target, db:
        applied_db = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(start)
    mod = tvm.IRModule(dict(lowered.mod.functions), attrs=lowered.mod.attrs)
    tuned = []
    for gv, f in applied_db.functions.items():  # kernels the database has a schedule for; the rest keep the default
        if isinstance(f, tvm.tirx.PrimFunc) and _is_scheduled(f) and not _is_scheduled(start[gv]):
            mod[gv] = f
            tuned.append(gv)
    mod, dropped = _drop_unbuildable(mod, lowered.mod, tuned, target, say)
    applied = len(tuned) - len(dropped)
    info = {
        "tuned": True,
        "tuning_db": str(work),
        "tuning_tasks": len(tasks),
        "tuned_kernels": applied,
        "tuning_trials_run": ran,
        "tuning_trials_failed": failed,
        "tuning_seconds": round(time.time() - t0, 1),
        "tuning_measured_on": f"rpc:{rpc['tracker']}/{rpc['key']}" if rpc else "local",
        "tuning_dropped": dropped,
    }
    say(f"tuning done: {ran} trials this run, {applied} kernels use tuned schedules ({info['tuning_seconds']} s)")
    return mod, info
