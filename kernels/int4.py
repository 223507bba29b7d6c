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
