"""Elementwise integer ops: residual add (TFLite ADD), mul, clamp and table lookup, with
numpy-style broadcasting."""

from __future__ import annotations

from tvm import te, tirx

from kernels.requant import c64, clamp_i8, requantize_expr


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


def add(
    a: te.Tensor,
    b: te.Tensor,
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
) -> te.Tensor:
    """TFLite ADD: both inputs shifted left, rescaled to a common scale, summed, rescaled."""
    shape = broadcast_shape(a.shape, b.shape)

    def f(*idx):
        xa = (_at(a, idx).astype("int64") - c64(za)) << c64(left_shift)
        xb = (_at(b, idx).astype("int64") - c64(zb)) << c64(left_shift)
        sa = requantize_expr(xa, multiplier_a, shift_a)
        sb = requantize_expr(xb, multiplier_b, shift_b)
        return clamp_i8(requantize_expr(sa + sb, multiplier, shift) + c64(zout), act_min, act_max)

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
