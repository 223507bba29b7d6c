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


def epilogue(acc: te.Tensor, bias: te.Tensor | None, m: te.Tensor, shift: te.Tensor, zout: int,
             act_min: int, act_max: int, name: str = "requant") -> te.Tensor:
    """int32 accumulators [..., O] + bias[O] -> requantize per channel -> + zout -> clamp -> int8."""

    def f(*idx):
        o = idx[-1]
        v = _i64(acc[idx])
        if bias is not None:
            v = v + _i64(bias[o])
        return clamp_i8(requantize_expr(v, m[o], shift[o]) + c64(zout), act_min, act_max)

    return te.compute(acc.shape, f, name=name)


def requantize_op(x: te.Tensor, m: te.Tensor, shift: te.Tensor, *, zin: int, zout: int,
                  act_min: int, act_max: int) -> te.Tensor:
    """The standalone ``requantize`` operator: int8 -> int8 rescale (m, shift broadcast on the last axis)."""
    per_channel = m.shape[0] != 1

    def f(*idx):
        c = idx[-1] if per_channel else 0
        v = _i64(x[idx]) - c64(zin)
        return clamp_i8(requantize_expr(v, m[c], shift[c]) + c64(zout), act_min, act_max)

    return te.compute(x.shape, f, name="requantize")
