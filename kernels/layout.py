"""Data movement: pad (any axis), concat with per-input rescale, transpose."""

from __future__ import annotations

from tvm import te, tirx

from kernels.requant import c64, clamp_i8, requantize_expr


def pad(x: te.Tensor, *, pads, fill: int) -> te.Tensor:
    """pads [[before, after], ...] per axis, filled with ``fill`` (the output zero point)."""
    shape = tuple(int(d) + int(b) + int(a) for d, (b, a) in zip(x.shape, pads, strict=True))

    def f(*idx):
        conds = [tirx.all(i >= int(b), i < int(b) + int(d)) for i, d, (b, _) in zip(idx, x.shape, pads, strict=True)]
        src = tuple(i - int(b) for i, (b, _) in zip(idx, pads, strict=True))
        return tirx.if_then_else(tirx.all(*conds), x[src], tirx.const(int(fill), x.dtype))

    return te.compute(shape, f, name="pad")


def concat(*xs: te.Tensor, axis: int, rescales, zins, zout: int) -> te.Tensor:
    """Concatenate along ``axis``; input ``i`` is rescaled by ``rescales[i]`` = (m, shift) or copied (None)."""
    nd = len(xs[0].shape)
    axis = axis % nd
    offsets = [0]
    for x in xs:
        offsets.append(offsets[-1] + int(x.shape[axis]))
    shape = list(int(d) for d in xs[0].shape)
    shape[axis] = offsets[-1]

    def val(k, idx):
        src = list(idx)
        src[axis] = idx[axis] - offsets[k]
        v = xs[k][tuple(src)]
        if rescales[k] is None:
            return v
        m, s = rescales[k]
        return clamp_i8(requantize_expr(v.astype("int64") - c64(zins[k]), m, s) + c64(zout))

    def f(*idx):
        out = val(len(xs) - 1, idx)
        for k in range(len(xs) - 2, -1, -1):
            out = tirx.Select(idx[axis] < offsets[k + 1], val(k, idx), out)
        return out

    return te.compute(tuple(shape), f, name="concat")


def transpose(x: te.Tensor, *, perm) -> te.Tensor:
    shape = tuple(int(x.shape[p]) for p in perm)

    def f(*idx):
        src = [None] * len(perm)
        for out_axis, in_axis in enumerate(perm):
            src[in_axis] = idx[out_axis]
        return x[tuple(src)]

    return te.compute(shape, f, name="transpose")


def reshape(x: te.Tensor, *, shape) -> te.Tensor:
    """Row-major reshape via a flat index."""
    in_shape = [int(d) for d in x.shape]

    def f(*idx):
        flat = c64(0).astype("int64")
        for i, d in zip(idx, shape, strict=True):
            flat = flat * int(d) + i.astype("int64")
        src = []
        for d in reversed(in_shape):
            src.append(flat % d)
            flat = flat // d
        return x[tuple(reversed(src))]

    return te.compute(tuple(int(d) for d in shape), f, name="reshape")
