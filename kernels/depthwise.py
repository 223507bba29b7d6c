"""NHWC int8 depthwise conv2d (groups == channels, channel multiplier ``O // C``) + requantize.

Weights arrive as the QuantModel stores them, [O, KH, KW, 1]; output channel ``o`` reads
input channel ``o // multiplier``. The input zero point is folded into the bias as in conv2d.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from kernels.conv2d import out_size, pad_nhwc
from kernels.requant import epilogue


def depthwise_acc(x: te.Tensor, w: te.Tensor, *, strides, dilations, pads, zin: int) -> te.Tensor:
    n, h, wd, c = (int(d) for d in x.shape)
    o, kh, kw, _ = (int(d) for d in w.shape)
    mult = o // c
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    oh = out_size(h, kh, sh, dh, pads[0], pads[2])
    ow = out_size(wd, kw, sw, dw, pads[1], pads[3])
    xp = pad_nhwc(x, pads, zin)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")

    def ch(oc):
        return oc if mult == 1 else oc // mult

    return te.compute(
        (n, oh, ow, o),
        lambda b, i, j, oc: te.sum(
            xp[b, i * sh + rh * dh, j * sw + rw * dw, ch(oc)].astype("int32") * w[oc, rh, rw, 0].astype("int32"),
            axis=[rh, rw],
        ),
        name="dw_acc",
    )


def depthwise_conv2d_nhwc(x: te.Tensor, w: te.Tensor, bias: te.Tensor, m: te.Tensor, shift: te.Tensor, *, strides,
                          dilations, pads, zin: int, zout: int, act_min: int, act_max: int) -> te.Tensor:
    """Fused depthwise conv2d + requantize (bias holds the folded input zero point)."""
    acc = depthwise_acc(x, w, strides=strides, dilations=dilations, pads=pads, zin=zin)
    return epilogue(acc, bias, m, shift, zout, act_min, act_max)


def pack_weight_hwo(weight: np.ndarray) -> np.ndarray:
    """[O, KH, KW, 1] -> [KH, KW, O]: the output channels innermost, so a vector of channels is one load."""
    return np.ascontiguousarray(weight[..., 0].transpose(1, 2, 0))


def depthwise_conv2d_hwo(x: te.Tensor, w: te.Tensor, bias: te.Tensor, m: te.Tensor, shift: te.Tensor, *, strides,
                         dilations, pads, zin: int, zout: int, act_min: int, act_max: int,
                         narrow: bool | str = False) -> te.Tensor:
    """``depthwise_conv2d_nhwc`` over ``pack_weight_hwo`` weights [KH, KW, O] (stages ``pad``, ``dw_acc``,
    ``requant``; ``schedule.schedule_depthwise`` vectorizes the channels)."""
    n, h, wd, c = (int(d) for d in x.shape)
    kh, kw, o = (int(d) for d in w.shape)
    mult = o // c
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    oh = out_size(h, kh, sh, dh, pads[0], pads[2])
    ow = out_size(wd, kw, sw, dw, pads[1], pads[3])
    xp = pad_nhwc(x, pads, zin)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")

    def ch(oc):
        return oc if mult == 1 else oc // mult

    acc = te.compute(
        (n, oh, ow, o),
        lambda b, i, j, oc: te.sum(
            xp[b, i * sh + rh * dh, j * sw + rw * dw, ch(oc)].astype("int32") * w[rh, rw, oc].astype("int32"),
            axis=[rh, rw],
        ),
        name="dw_acc",
    )
    return epilogue(acc, bias, m, shift, zout, act_min, act_max, narrow=narrow)
