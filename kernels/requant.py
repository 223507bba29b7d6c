"""The fused requantization epilogue: dyadic multiply + rounding shift + clamp, in TE.

``requantize_expr`` is the TIR form of ``edgekit.quant.arith.requantize``::

    a = x << max(shift, 0)
    h = clamp((a * M + 2**30) >> 31, INT32_MIN, INT32_MAX)      # SQRDMULH
    n = max(-shift, 0)
    y = (h + ((1 << n) >> 1)) >> n                              # RSHR, n == 0 -> h

all in int64 with arithmetic shifts. ``M`` and ``shift`` may be per-channel tensor elements.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

I64 = "int64"
INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def c64(v: int) -> tirx.PrimExpr:
    """An int64 constant."""
    return tirx.const(int(v), I64)


def _i64(e) -> tirx.PrimExpr:
    if isinstance(e, int | np.integer):
        return c64(int(e))
    ty = getattr(e, "ty", None) or getattr(e, "dtype", None)
    return e if str(ty) == I64 else e.astype(I64)


def requantize_expr(x, m, shift) -> tirx.PrimExpr:
    """Dyadic rescale of ``x`` by (m, shift): int64 result, before zero point and clamp."""
    x, m, shift = _i64(x), _i64(m), _i64(shift)
    zero = c64(0)
    left = tirx.max(shift, zero)
    right = tirx.max(zero - shift, zero)
    a = x << left
    h = (a * m + c64(1 << 30)) >> c64(31)
    h = tirx.min(tirx.max(h, c64(INT32_MIN)), c64(INT32_MAX))
    return (h + ((c64(1) << right) >> c64(1))) >> right


def clamp_i8(y, act_min: int = -128, act_max: int = 127) -> tirx.PrimExpr:
    """Clamp an int64 value to [act_min, act_max] and cast to int8."""
    lo, hi = max(int(act_min), -128), min(int(act_max), 127)
    return tirx.Cast("int8", tirx.min(tirx.max(_i64(y), c64(lo)), c64(hi)))


def narrow_ok(weight: np.ndarray, bias: np.ndarray, m: np.ndarray, shift: np.ndarray, act_span: int = 255) -> bool:
    """True when the 32-bit epilogue (``epilogue(..., narrow=True)``) is exact for this layer: every
    ``(acc + bias) << max(shift, 0)`` fits int32 given |activation| <= ``act_span`` (the worst case
    over all inputs, from the weights), ``M`` > INT32_MIN (so SQRDMULH cannot saturate) and shifts in
    [-31, 30]."""
    w = np.abs(weight.reshape(weight.shape[0], -1).astype(np.int64)).sum(axis=1)
    b = np.abs(np.broadcast_to(np.asarray(bias, np.int64), w.shape))
    sh = np.broadcast_to(np.asarray(shift, np.int64), w.shape)
    mm = np.asarray(m, np.int64)
    if sh.min(initial=0) < -31 or sh.max(initial=0) > 30 or mm.min(initial=0) <= INT32_MIN:
        return False
    bound = (w * int(act_span) + b) << np.maximum(sh, 0)
    return bool(bound.max(initial=0) <= INT32_MAX)


def narrow_mode(
    weight: np.ndarray, bias: np.ndarray, m: np.ndarray, shift: np.ndarray, act_span: int = 255
) -> bool | str:
    """The ``narrow`` argument of ``epilogue`` for this layer: False, True, or "right" (no left shifts)."""
    if not narrow_ok(weight, bias, m, shift, act_span):
        return False
    return "right" if int(np.max(shift, initial=0)) <= 0 else True


def requantize_expr_i32(v, m, shift, left: bool = True) -> tirx.PrimExpr:
    """``requantize_expr`` on an int32 ``v`` whose ``v << max(shift, 0)`` fits int32 (``narrow_ok``), as
    one 32x32->64 multiply, one add and one shift: with no SQRDMULH saturation possible, the two
    roundings nest exactly, ``RSHR((a*M + 2**30) >> 31, n) == (a*M + 2**30 + [n > 0] 2**(30+n)) >> (31+n)``
    (floor(floor(X / 2**31) + c) / 2**n) == floor((X + c 2**31) / 2**(31+n)) for an integer c).
    ``left=False``: every shift of the layer is <= 0 (no left shift emitted). Returns int32."""
    i32 = "int32"
    shift = shift.astype(i32) if str(shift.dtype) != i32 else shift
    zero = tirx.const(0, i32)
    a = v << tirx.max(shift, zero) if left else v
    right = tirx.max(zero - shift, zero).astype(I64)
    rnd = c64(1 << 30) + tirx.Select(right > c64(0), c64(1) << (right + c64(30)), c64(0))
    return ((a.astype(I64) * m.astype(I64) + rnd) >> (right + c64(31))).astype(i32)


def epilogue_value(v, b, m, shift, zout: int, act_min: int, act_max: int, narrow: bool | str = False):
    """One output of ``epilogue``: int32 accumulator ``v`` (+ bias ``b`` unless None), requantized by the
    channel's (``m``, ``shift``), + zout, clamped, as an int8 expression."""
    if narrow:
        lo, hi = max(int(act_min), -128), min(int(act_max), 127)
        v = v if b is None else v + b
        y = requantize_expr_i32(v, m, shift, left=narrow != "right") + tirx.const(int(zout), "int32")
        return tirx.Cast("int8", tirx.min(tirx.max(y, tirx.const(lo, "int32")), tirx.const(hi, "int32")))
    v = _i64(v)
    if b is not None:
        v = v + _i64(b)
    return clamp_i8(requantize_expr(v, m, shift) + c64(zout), act_min, act_max)


def epilogue(
    acc: te.Tensor,
    bias: te.Tensor | None,
    m: te.Tensor,
    shift: te.Tensor,
    zout: int,
    act_min: int,
    act_max: int,
    name: str = "requant",
    narrow: bool | str = False,
    then=None,
) -> te.Tensor:
    """int32 accumulators [..., O] + bias[O] -> requantize per channel -> + zout -> clamp -> int8.
    ``narrow``: 32-bit arithmetic around one 32x32->64 multiply, only when ``narrow_ok`` holds;
    ``"right"``: also every shift <= 0 (``narrow_mode``). ``then(y, idx)``: an int8 expression of the
    requantized int8 ``y`` at output index ``idx`` computed in the same stage instead of ``y`` (a fused
    residual add, ``elementwise.add_value``)."""

    def f(*idx):
        o = idx[-1]
        y = epilogue_value(acc[idx], None if bias is None else bias[o], m[o], shift[o], zout, act_min, act_max, narrow)
        return y if then is None else then(y, idx)

    return te.compute(acc.shape, f, name=name)


def requantize_op(
    x: te.Tensor, m: te.Tensor, shift: te.Tensor, *, zin: int, zout: int, act_min: int, act_max: int
) -> te.Tensor:
    """The standalone ``requantize`` operator: int8 -> int8 rescale (m, shift broadcast on the last axis)."""
    per_channel = m.shape[0] != 1

    def f(*idx):
        c = idx[-1] if per_channel else 0
        v = _i64(x[idx]) - c64(zin)
        return clamp_i8(requantize_expr(v, m[c], shift[c]) + c64(zout), act_min, act_max)

    return te.compute(x.shape, f, name="requantize")
