"""int4 weights: two signed nibbles per byte (low nibble first), packed at compile time,
unpacked inside the kernel. The byte format is ``edgekit.qmodel.pack_int4``'s."""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from edgekit.qmodel import pack_int4, unpack_int4

__all__ = ["pack_int4", "unpack_int4", "unpack_int4_te", "packed_nbytes"]


def packed_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes a packed int4 tensor of ``shape`` takes."""
    return (int(np.prod(shape)) + 1) // 2


def unpack_int4_te(packed: te.Tensor, shape: tuple[int, ...], name: str = "w_unpack") -> te.Tensor:
    """A TE stage turning packed uint8 [ceil(n/2)] into int8 ``shape`` (sign-extended nibbles)."""
    strides = []
    s = 1
    for d in reversed(shape):
        strides.append(s)
        s *= int(d)
    strides = list(reversed(strides))

    def f(*idx):
        flat = idx[0] * strides[0]
        for i, st in zip(idx[1:], strides[1:], strict=True):
            flat = flat + i * st
        byte = packed[flat // 2].astype("int32")
        nib = tirx.Select(flat % 2 == 0, byte & 15, (byte >> 4) & 15)
        return tirx.Cast("int8", tirx.Select(nib > 7, nib - 16, nib))

    return te.compute(shape, f, name=name)


# ---- blocked int4 for the dot-product kernels: both nibbles of a byte in the same tile ----------


def pack_int4_tiles(wp: np.ndarray) -> np.ndarray:
    """int8 weights whose last two axes are one intrinsic tile (nb x kb, e.g. 16 x 4) -> uint8 bytes:
    within each tile of ``t`` values, byte ``j`` holds value ``j`` (low nibble) and value ``j + t/2``
    (high nibble), so unpacking a tile reads ``t/2`` consecutive bytes twice (vector loads, no gathers)."""
    t = int(wp.shape[-1]) * int(wp.shape[-2])
    f = wp.reshape(-1, t).astype(np.int16)
    h = t // 2
    return np.ascontiguousarray(((f[:, :h] & 15) | ((f[:, h:] & 15) << 4)).astype(np.uint8).reshape(-1))


def unpack_int4_tiles_te(packed: te.Tensor, shape: tuple[int, ...], name: str = "w_unpack") -> te.Tensor:
    """The inverse of ``pack_int4_tiles`` as a TE stage producing int8 ``shape``."""
    shape = tuple(int(d) for d in shape)
    nb, kb = shape[-2], shape[-1]
    h = nb * kb // 2

    def f(*idx):
        blk = idx[0]
        for i, d in zip(idx[1:-2], shape[1:-2], strict=True):
            blk = blk * d + i
        e = idx[-2] * kb + idx[-1]
        byte = packed[blk * h + e % h].astype("int32")
        nib = tirx.Select(e < h, byte & 15, (byte >> 4) & 15)
        return tirx.Cast("int8", tirx.Select(nib > 7, nib - 16, nib))

    return te.compute(shape, f, name=name)
