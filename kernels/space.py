"""The knobs of edgekit's hand schedules and the design space the auto-tuner searches.

Every kernel edgekit emits carries ``edgekit.schedule`` (its schedule kind) and, when tensorized,
``edgekit.intrin`` (the dot-product intrinsic). ``schedule_default`` applies a kind's schedule with
its default knobs (what an untuned compile uses); ``design_space`` lists one concrete schedule per
knob setting worth measuring (register tiles that fit the target's vector registers, loop orders),
which MetaSchedule (``edgekit.compile.tune``) measures and keeps in its database like any other
schedule. Each candidate is a plain, deterministic schedule: a tuned kernel is always one of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product
from math import prod
from typing import Any

from kernels import schedule as ksched
from kernels import tensorize as ktz

KIND_ATTR = "edgekit.schedule"
INTRIN_ATTR = "edgekit.intrin"
TUNABLE = ("conv", "gemm", "depthwise")  # kinds with knobs; the others keep their one hand schedule

# below this many multiply-adds a conv / depthwise kernel runs its rows on one thread by default (a
# thread-pool launch costs about 1 us); the tuner also measures the other choice
PARALLEL_MIN_MACS = 1 << 21

# int32 accumulator vectors a register tile may hold (AVX-512: 32 zmm, ARM: 32 q registers; the rest
# hold the broadcast activations and the weight vectors)
ACCUMULATORS = {ktz.VNNI_INTRIN: 24, ktz.SDOT_INTRIN: 20, ktz.NEON_INTRIN: 12}


def kind_of(family: str) -> str | None:
    """The schedule kind of a kernel family without a dot-product intrinsic."""
    base = family.removesuffix("_int4")
    if base == "depthwise":
        return "depthwise"
    if base == "pool":
        return "pool"
    if base in ksched.ELEMENTWISE:
        return "elementwise"
    return None


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _tiles(extents: list[int], limits: list[int], budget: int) -> list[tuple[int, ...]]:
    """Register tiles (one divisor of each extent, each under its limit) with at most ``budget``
    accumulators, dropping tiles under a quarter of the largest one that fits (too few independent
    accumulators to hide the multiply-add latency)."""
    tiles = list(product(*(_divisors(e, lim) for e, lim in zip(extents, limits, strict=True))))
    tiles = [t for t in tiles if prod(t) <= budget] or [tuple(1 for _ in extents)]
    biggest = max(prod(t) for t in tiles)
    return [t for t in tiles if prod(t) * 4 >= biggest]


def _extents(sch, block: str) -> list[int]:
    return [int(sch.get(lp).extent) for lp in sch.get_loops(sch.get_sblock(block))]


def knob_space(sch, kind: str, intrin: str | None) -> Iterator[dict[str, Any]]:
    """The knob settings of a ``kind`` kernel worth measuring (the default first)."""
    yield default_knobs(sch, kind, intrin)
    budget = ACCUMULATORS.get(intrin or "", 16)
    if kind == "conv":
        _b, oh, ow, on, _oi, kh, kw, ib, _kb = _extents(sch, "conv_acc")
        orders = (True, False) if kh * kw > 1 and ib > 1 else (True,)
        par = _parallel_choices(_macs(sch, "conv_acc"))
        for (ohb, owb, ocb), wo, p in product(_tiles([oh, ow, on], [4, 16, 4], budget), orders, par):
            yield {"oh_block": ohb, "ow_block": owb, "oc_block": ocb, "window_outer": wo, "parallel": p}
    elif kind == "gemm":
        m, pn, _nb, _pk, _kb = _extents(sch, "gemm_acc")
        for rb, cb in _tiles([m, pn], [8, 8], budget):
            yield {"row_block": rb, "col_block": cb}
    elif kind == "depthwise":
        ow = _extents(sch, "dw_acc")[2]
        for owb, p in product(_divisors(ow, 16), _parallel_choices(_macs(sch, "dw_acc"))):
            yield {"ow_block": owb, "parallel": p}


def _macs(sch, block: str) -> int:
    return prod(_extents(sch, block))


def _parallel_choices(macs: int) -> tuple[bool, ...]:
    """Row parallelism worth measuring: both choices near the threshold, one far from it."""
    if macs >= PARALLEL_MIN_MACS * 8:
        return (True,)
    if macs * 8 < PARALLEL_MIN_MACS:
        return (False,)
    return (True, False)


def default_knobs(sch, kind: str, intrin: str | None) -> dict[str, Any]:
    """The knobs of an untuned compile: tiles of about 16 accumulators (measured on AVX-512 VNNI:
    a 1024^3 GEMM goes from 569 GOPS with 4 x 1 blocks to 1068 with 8 x 2)."""
    if kind == "conv":
        _b, oh, ow, on, _oi, *_ = _extents(sch, "conv_acc")
        owb = max(_divisors(ow, 8))
        ocb = max(_divisors(on, 2))
        ohb = max(_divisors(oh, max(1, 16 // (owb * ocb))))
        par = _macs(sch, "conv_acc") >= PARALLEL_MIN_MACS
        return {"oh_block": ohb, "ow_block": owb, "oc_block": ocb, "window_outer": True, "parallel": par}
    if kind == "gemm":
        m, pn, *_ = _extents(sch, "gemm_acc")
        cb = max(_divisors(pn, 2 if m > 1 else 8))
        return {"row_block": max(_divisors(m, 16 // cb)), "col_block": cb}
    if kind == "depthwise":
        return {"ow_block": 8, "parallel": _macs(sch, "dw_acc") >= PARALLEL_MIN_MACS}
    return {}


def apply_schedule(sch, kind: str, intrin: str | None, knobs: dict[str, Any], threads: int = 1) -> None:
    """Schedule ``sch`` (one kernel) as ``kind`` with ``knobs``."""
    if kind == "conv":
        ktz.schedule_conv(sch, intrin, **knobs)
    elif kind == "gemm":
        ktz.schedule_gemm(sch, intrin, threads=threads, **knobs)
    elif kind == "depthwise":
        ksched.schedule_depthwise(sch, **knobs)
    elif kind == "pool":
        ksched.schedule_pool(sch)
    elif kind == "elementwise":
        names = [b for b in sorted(ksched.ELEMENTWISE) if ktz._has_block(sch, b)]
        if len(names) != 1:
            raise ValueError(f"an elementwise kernel has {len(names)} elementwise blocks")
        ksched.schedule_elementwise(sch, names[0])
    else:
        raise ValueError(f"unknown schedule kind {kind!r}")


def tag(func, kind: str | None, intrin: str | None = None):
    """``func`` marked with its schedule kind (and intrinsic) for ``schedule_default`` and the tuner."""
    if kind is None:
        return func
    func = func.with_attr(KIND_ATTR, kind)
    return func.with_attr(INTRIN_ATTR, intrin) if intrin else func


def kind_and_intrin(func) -> tuple[str | None, str | None]:
    attrs = func.attrs
    if attrs is None or KIND_ATTR not in attrs:
        return None, None
    intrin = attrs[INTRIN_ATTR] if INTRIN_ATTR in attrs else None
    return str(attrs[KIND_ATTR]), (str(intrin) if intrin is not None else None)


def schedule_default(func, threads: int = 1):
    """``func`` scheduled with its kind's default knobs and marked ``tirx.is_scheduled``; unchanged
    when it has no kind, or (for the kinds without a dot-product intrinsic, which are correct
    unscheduled, only slower) when TVM rejects the schedule."""
    from tvm import s_tir

    kind, intrin = kind_and_intrin(func)
    if kind is None:
        return func
    sch = s_tir.Schedule(func)
    try:
        apply_schedule(sch, kind, intrin, default_knobs(sch, kind, intrin), threads)
    except Exception:  # noqa: BLE001 - TVM raises many error types
        if intrin is not None:  # a tensorized kernel has no unscheduled fallback: a bug to report
            raise
        return func
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _distinct(sch, kind: str, intrin: str | None) -> list[dict[str, Any]]:
    out, seen = [], set()
    for knobs in knob_space(sch, kind, intrin):
        key = tuple(sorted(knobs.items()))
        if key not in seen:
            seen.add(key)
            out.append(knobs)
    return out


def space_size(func) -> int:
    """How many candidates ``design_space`` offers for ``func`` (1 for a kernel without knobs)."""
    from tvm import s_tir

    kind, intrin = kind_and_intrin(func)
    return len(_distinct(s_tir.Schedule(func), kind, intrin)) if kind in TUNABLE else 1


def design_space(sch) -> list:
    """MetaSchedule space generator (``ScheduleFn``): one schedule per distinct knob setting of the
    kernel in ``sch``, each built from a copy of ``sch`` (settings TVM rejects are left out)."""
    kind, intrin = kind_and_intrin(sch.mod["main"])
    if kind not in TUNABLE:
        return [sch]
    out = []
    for knobs in _distinct(sch, kind, intrin):
        cand = sch.copy()
        try:
            apply_schedule(cand, kind, intrin, knobs)
        except Exception:  # noqa: BLE001 - a knob setting TVM cannot apply is not a candidate
            continue
        out.append(cand)
    return out or [sch]
