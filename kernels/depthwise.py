"""NHWC int8 depthwise conv2d (groups == channels, channel multiplier ``O // C``) + requantize.

Weights arrive as the QuantModel stores them, [O, KH, KW, 1], and are transposed at compile time to
[KH, KW, O] (``pack_weight_hwo``) so a vector of output channels is one load; output channel ``o``
reads input channel ``o // multiplier``. The input zero point is folded into the bias as in conv2d.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from kernels.conv2d import pad_nhwc, window
from kernels.requant import epilogue


def pack_weight_hwo(weight: np.ndarray) -> np.ndarray:
    """[O, KH, KW, 1] -> [KH, KW, O]: the output channels innermost, so a vector of channels is one load."""
    return np.ascontiguousarray(weight[..., 0].transpose(1, 2, 0))


def depthwise_conv2d_hwo(
    x: te.Tensor,
    w: te.Tensor,
    bias: te.Tensor,
    m: te.Tensor,
    shift: te.Tensor,
    *,
    strides,
    dilations,
    pads,
    zin: int,
    zout: int,
    act_min: int,
    act_max: int,
    narrow: bool | str = False,
) -> te.Tensor:
    """Fused depthwise conv2d + requantize over ``pack_weight_hwo`` weights [KH, KW, O] (bias holds the
    folded input zero point). Stages ``pad``, ``dw_acc``, ``requant`` (``schedule.schedule_depthwise``)."""
    kh, kw, o = (int(d) for d in w.shape)
    g = window(x, (kh, kw), strides, dilations, pads)
    mult = o // g.c
    xp = pad_nhwc(x, pads, zin)
    rh, rw = g.reduce_axes()

    def f(b, i, j, oc):
        y, xx = g.src(i, j, rh, rw)
        ch = oc if mult == 1 else oc // mult
        return te.sum(xp[b, y, xx, ch].astype("int32") * w[rh, rw, oc].astype("int32"), axis=[rh, rw])

    acc = te.compute((g.n, g.oh, g.ow, o), f, name="dw_acc")
    return epilogue(acc, bias, m, shift, zout, act_min, act_max, narrow=narrow)
