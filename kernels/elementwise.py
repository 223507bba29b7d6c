"""Elementwise integer ops: residual add (TFLite ADD), mul, clamp and table lookup, with
numpy-style broadcasting."""

from __future__ import annotations

from tvm import te, tirx

from kernels.requant import I64, INT32_MAX, INT32_MIN, c64, clamp_i8, requantize_expr


def broadcast_shape(*shapes) -> tuple[int, ...]:
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {int(s[i - nd + len(s)]) for s in shapes if i - nd + len(s) >= 0} - {1}
        if len(dims) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _at(t: te.Tensor, idx):
    """t indexed by output indices ``idx`` under broadcasting."""
    nd = len(t.shape)
    sub = idx[len(idx) - nd :]
    return t[tuple(0 if int(d) == 1 else i for i, d in zip(sub, t.shape, strict=True))]


ADD_PARAMS = ("left_shift", "multiplier_a", "shift_a", "multiplier_b", "shift_b", "multiplier", "shift")


def _rq_bound(bound: int, m: int, shift: int) -> int | None:
    """An upper bound of ``|requantize(x, m, shift)|`` over ``|x| <= bound``, or None when the 32-bit form
    (``requant.requantize_expr_i32``) is not exact there: ``x << max(shift, 0)`` must fit int32, ``m`` must
    not be INT32_MIN (no SQRDMULH saturation) and the shift must lie in [-31, 30]."""
    if not -31 <= shift <= 30 or not INT32_MIN < m <= INT32_MAX:
        return None
    a = bound << max(shift, 0)
    if a > INT32_MAX:
        return None
    h = ((a * abs(m) + (1 << 30)) >> 31) + 1
    n = max(-shift, 0)
    return ((h + ((1 << n) >> 1)) >> n) + 1


def add_narrow_ok(
    *,
    za: int,
    zb: int,
    zout: int,
    left_shift: int,
    multiplier_a: int,
    shift_a: int,
    multiplier_b: int,
    shift_b: int,
    multiplier: int,
    shift: int,
    **_,
) -> bool:
    """True when every intermediate of the TFLite ADD formula fits int32 for all int8 inputs, so
    ``add_value(..., narrow=True)`` (32-bit arithmetic, one 32x32->64 multiply per rescale) is exact."""
    if not 0 <= left_shift <= 31:
        return False
    xa = max(abs(-128 - za), abs(127 - za)) << left_shift
    xb = max(abs(-128 - zb), abs(127 - zb)) << left_shift
    if max(xa, xb) > INT32_MAX:
        return False
    sa, sb = _rq_bound(xa, multiplier_a, shift_a), _rq_bound(xb, multiplier_b, shift_b)
    if sa is None or sb is None or sa + sb > INT32_MAX:
        return False
    y = _rq_bound(sa + sb, multiplier, shift)
    return y is not None and y + abs(zout) <= INT32_MAX


def _rq_i32(v, m: int, shift: int):
    """``requant.requantize_expr_i32`` for constant (m, shift): int32 ``v`` -> int32."""
    left, right = max(shift, 0), max(-shift, 0)
    a = v << tirx.const(left, "int32") if left else v
    rnd = (1 << 30) + ((1 << (right + 30)) if right else 0)
    return ((a.astype(I64) * c64(m) + c64(rnd)) >> c64(31 + right)).astype("int32")


def _operand_split(z: int, left_shift: int, m: int, shift: int) -> tuple[int, int, int, int] | None:
    """For ``requantize((v - z) << left_shift, m, shift)`` of an int8 ``v`` inside ``add_narrow_ok``:
    (mh, ml, r, t) with the value ``d * mh + ((d * ml + r) >> t)``, ``d = v - z``, every step in int32,
    or None when a bound does not hold. Exact: with ``p = left_shift + max(shift, 0) <= 30`` and
    ``n = max(-shift, 0)`` the rescale is ``floor((d m 2**p + R) / 2**(31+n))``, ``R = 2**30 + [n > 0]
    2**(30+n)`` (``requantize_expr_i32``), and 2**p divides R, so it is ``floor((d m + R/2**p) / 2**t)``,
    ``t = 31 + n - p``; with ``m = mh 2**t + ml`` (0 <= ml < 2**t) that is ``d mh + floor((d ml + r) / 2**t)``."""
    p, n = left_shift + max(shift, 0), max(-shift, 0)
    if p > 30:
        return None
    t = 31 + n - p
    big = (1 << 30) + ((1 << (30 + n)) if n else 0)
    r = big >> p
    mh, ml = m >> t, m & ((1 << t) - 1)
    dmax = max(abs(-128 - z), abs(127 - z))
    if dmax * abs(mh) + dmax * ml + r + 1 > INT32_MAX:
        return None
    return mh, ml, r, t


def _rq_operand(v, z: int, left_shift: int, m: int, shift: int):
    """``requantize((v - z) << left_shift, m, shift)`` for int8 ``v`` in int32 (``add_narrow_ok``)."""
    i32 = "int32"
    d = v.astype(i32) - tirx.const(int(z), i32)
    split = _operand_split(z, left_shift, m, shift)
    if split is None:
        return _rq_i32(d << tirx.const(int(left_shift), i32), m, shift)
    mh, ml, r, t = (tirx.const(int(c), i32) for c in split)
    return d * mh + ((d * ml + r) >> t)


def add_value(
    va,
    vb,
    *,
    za: int,
    zb: int,
    zout: int,
    left_shift: int,
    multiplier_a: int,
    shift_a: int,
    multiplier_b: int,
    shift_b: int,
    multiplier: int,
    shift: int,
    act_min: int,
    act_max: int,
    narrow: bool = False,
):
    """TFLite ADD of two int8 expressions: both shifted left, rescaled to a common scale, summed,
    rescaled, + zout, clamped; an int8 expression. ``narrow``: in int32 (``add_narrow_ok`` must hold)."""
    if narrow:
        i32 = "int32"
        sa = _rq_operand(va, za, left_shift, multiplier_a, shift_a)
        sb = _rq_operand(vb, zb, left_shift, multiplier_b, shift_b)
        # ``^ 0``: an identity TVM's simplifier does not look through; without it, it distributes the
        # final rescale's multiply over the sum (two 64-bit multiplies instead of one, LLVM folds the xor)
        y = _rq_i32((sa + sb) ^ tirx.const(0, i32), multiplier, shift) + tirx.const(int(zout), i32)
        lo, hi = max(int(act_min), -128), min(int(act_max), 127)
        return tirx.Cast("int8", tirx.min(tirx.max(y, tirx.const(lo, i32)), tirx.const(hi, i32)))
    xa = (va.astype("int64") - c64(za)) << c64(left_shift)
    xb = (vb.astype("int64") - c64(zb)) << c64(left_shift)
    sa = requantize_expr(xa, multiplier_a, shift_a)
    sb = requantize_expr(xb, multiplier_b, shift_b)
    return clamp_i8(requantize_expr(sa + sb, multiplier, shift) + c64(zout), act_min, act_max)


def add(a: te.Tensor, b: te.Tensor, *, narrow: bool | None = None, **params) -> te.Tensor:
    """TFLite ADD (``add_value``) with broadcasting; ``narrow`` None: int32 whenever ``add_narrow_ok``."""
    shape = broadcast_shape(a.shape, b.shape)
    if narrow is None:
        narrow = add_narrow_ok(**params)

    def f(*idx):
        return add_value(_at(a, idx), _at(b, idx), narrow=narrow, **params)

    return te.compute(shape, f, name="add")


def mul(
    a: te.Tensor, b: te.Tensor, *, za: int, zb: int, zout: int, multiplier: int, shift: int, act_min: int, act_max: int
) -> te.Tensor:
    """((a - za) * (b - zb)) rescaled by (multiplier, shift)."""
    shape = broadcast_shape(a.shape, b.shape)

    def f(*idx):
        p = (_at(a, idx).astype("int64") - c64(za)) * (_at(b, idx).astype("int64") - c64(zb))
        return clamp_i8(requantize_expr(p, multiplier, shift) + c64(zout), act_min, act_max)

    return te.compute(shape, f, name="mul")


def clamp(x: te.Tensor, *, act_min: int, act_max: int) -> te.Tensor:
    return te.compute(x.shape, lambda *i: clamp_i8(x[i].astype("int64"), act_min, act_max), name="clamp")


def lut(x: te.Tensor, table: te.Tensor) -> te.Tensor:
    """int8 -> int8 through a 256-entry table indexed by q + 128."""
    return te.compute(x.shape, lambda *i: table[x[i].astype("int32") + 128], name="lut")


def select_i8(cond, a, b):
    return tirx.Select(cond, a, b)
