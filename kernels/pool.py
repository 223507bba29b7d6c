"""Max and average pooling on int8 NHWC.

Average pooling is TFLite's integer average of the raw int8 values: the window sum, plus or
minus half the (border-clipped) count, divided by the count truncating toward zero (round half
away from zero), done without division as ``(|acc| + count // 2) * b >> k`` with per-position
magic numbers ``(b, k)`` from ``edgekit.quant.arith.division_magic``.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from edgekit.quant.arith import division_magic
from kernels.conv2d import out_size, pad_nhwc, window
from kernels.requant import c64, clamp_i8


def maxpool(x: te.Tensor, *, kernel, strides, pads, act_min: int = -128, act_max: int = 127) -> te.Tensor:
    g = window(x, kernel, strides, (1, 1), pads)
    xp = pad_nhwc(x, pads, -128)
    rh, rw = g.reduce_axes()

    def f(b, i, j, ch):
        y, xx = g.src(i, j, rh, rw)
        return te.max(xp[b, y, xx, ch], axis=[rh, rw])

    mx = te.compute((g.n, g.oh, g.ow, g.c), f, name="maxpool")
    if act_min <= -128 and act_max >= 127:
        return mx
    return te.compute(mx.shape, lambda *i: clamp_i8(mx[i].astype("int64"), act_min, act_max), name="clamp")


def avgpool_tables(h: int, w: int, kernel, strides, pads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: (count // 2, b, k) as int64 arrays [OH, OW]."""
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in strides)
    top, left = int(pads[0]), int(pads[1])
    oh, ow = out_size(h, kh, sh, 1, pads[0], pads[2]), out_size(w, kw, sw, 1, pads[1], pads[3])
    half = np.zeros((oh, ow), np.int64)
    mb = np.zeros((oh, ow), np.int64)
    mk = np.zeros((oh, ow), np.int64)
    for i in range(oh):
        r0, r1 = max(i * sh - top, 0), min(i * sh - top + kh, h)
        for j in range(ow):
            c0, c1 = max(j * sw - left, 0), min(j * sw - left + kw, w)
            cnt = max(r1 - r0, 0) * max(c1 - c0, 0)
            if cnt == 0:
                continue
            b, k = division_magic(cnt, 128 * kh * kw + cnt // 2)
            half[i, j], mb[i, j], mk[i, j] = cnt // 2, b, k
    return half, mb, mk


def avgpool(
    x: te.Tensor,
    half: te.Tensor,
    mb: te.Tensor,
    mk: te.Tensor,
    *,
    kernel,
    strides,
    pads,
    act_min: int = -128,
    act_max: int = 127,
) -> te.Tensor:
    g = window(x, kernel, strides, (1, 1), pads)
    xp = pad_nhwc(x, pads, 0)
    rh, rw = g.reduce_axes()

    def window_sum(b, i, j, ch):
        y, xx = g.src(i, j, rh, rw)
        return te.sum(xp[b, y, xx, ch].astype("int32"), axis=[rh, rw])

    acc = te.compute((g.n, g.oh, g.ow, g.c), window_sum, name="pool_sum")

    def f(b, i, j, ch):
        v = acc[b, i, j, ch].astype("int64")
        mag = tirx.Select(v < c64(0), c64(0) - v, v)
        q = ((mag + half[i, j]) * mb[i, j]) >> mk[i, j]
        return clamp_i8(tirx.Select(v < c64(0), c64(0) - q, q), act_min, act_max)

    return te.compute((g.n, g.oh, g.ow, g.c), f, name="avgpool")
