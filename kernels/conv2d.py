"""NHWC int8 conv2d with the fused requantization epilogue (groups == 1 and grouped).

The input zero point is folded into the bias at compile time (``fold_input_zero_point``):
``sum((x - zin) * w) = sum(x * w) - zin * sum(w)``, with padded cells holding ``zin``, so the
inner loop is a plain int8 x int8 -> int32 dot product (what ``sdot``/``vpdpbusd`` compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from kernels.requant import epilogue

# block annotation of a conv2d_dot ``act`` stage that only maps each input element (no padding): the
# schedule inlines it and the kernel reads its input in place
PLAIN_MAP = "edgekit.plain_map"


def out_size(size: int, k: int, stride: int, dilation: int, before: int, after: int) -> int:
    return (size + before + after - ((k - 1) * dilation + 1)) // stride + 1


def fold_input_zero_point(bias: np.ndarray, weight: np.ndarray, zin: int) -> np.ndarray:
    """bias - zin * sum(weight over all but the output axis), as int32 (checked)."""
    s = weight.reshape(weight.shape[0], -1).astype(np.int64).sum(axis=1)
    b = bias.astype(np.int64) - int(zin) * s
    if b.min(initial=0) < -(1 << 31) or b.max(initial=0) >= (1 << 31):
        raise OverflowError("folded bias does not fit int32")
    return b.astype(np.int32)


def pad_nhwc(x: te.Tensor, pads, fill: int, name: str = "pad") -> te.Tensor:
    """Spatial padding [top, left, bottom, right] of an NHWC tensor with a constant value."""
    top, left, bottom, right = (int(p) for p in pads)
    if top == left == bottom == right == 0:
        return x
    n, h, w, c = (int(d) for d in x.shape)
    fillv = tirx.const(int(fill), x.dtype)

    def f(b, i, j, ch):
        inside = tirx.all(i >= top, i < top + h, j >= left, j < left + w)
        return tirx.if_then_else(inside, x[b, i - top, j - left, ch], fillv)

    return te.compute((n, h + top + bottom, w + left + right, c), f, name=name)


@dataclass(frozen=True)
class Window:
    """A sliding window over an NHWC tensor: sizes, strides, dilations, padding and output size, shared
    by conv2d, depthwise and pooling. ``src(i, j, rh, rw)`` is the (row, column) an output position and a
    window offset read in the padded input."""

    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    oh: int
    ow: int

    def src(self, i, j, rh, rw):
        return i * self.sh + rh * self.dh, j * self.sw + rw * self.dw

    def reduce_axes(self):
        return te.reduce_axis((0, self.kh), "rh"), te.reduce_axis((0, self.kw), "rw")


def window(x: te.Tensor, kernel, strides, dilations, pads) -> Window:
    n, h, w, c = (int(d) for d in x.shape)
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    top, left, bottom, right = (int(p) for p in pads)
    return Window(
        n,
        h,
        w,
        c,
        kh,
        kw,
        sh,
        sw,
        dh,
        dw,
        (top, left, bottom, right),
        out_size(h, kh, sh, dh, top, bottom),
        out_size(w, kw, sw, dw, left, right),
    )


def conv2d_acc(x: te.Tensor, w: te.Tensor, *, strides, dilations, pads, zin: int, groups: int = 1) -> te.Tensor:
    """int32 accumulators [N, OH, OW, O] of an NHWC conv with weights [O, KH, KW, I/groups]."""
    o, kh, kw, ipg = (int(d) for d in w.shape)
    g = window(x, (kh, kw), strides, dilations, pads)
    xp = pad_nhwc(x, pads, zin)
    rh, rw = g.reduce_axes()
    rc = te.reduce_axis((0, ipg), "rc")
    opg = o // groups

    def chan(oc, r):
        return r if groups == 1 else (oc // opg) * ipg + r

    def f(b, i, j, oc):
        y, xx = g.src(i, j, rh, rw)
        return te.sum(xp[b, y, xx, chan(oc, rc)].astype("int32") * w[oc, rh, rw, rc].astype("int32"), axis=[rh, rw, rc])

    return te.compute((g.n, g.oh, g.ow, o), f, name="conv_acc")


def conv2d_nhwc(
    x: te.Tensor,
    w: te.Tensor,
    bias: te.Tensor,
    m: te.Tensor,
    shift: te.Tensor,
    *,
    strides,
    dilations,
    pads,
    groups: int,
    zin: int,
    zout: int,
    act_min: int,
    act_max: int,
    then=None,
) -> te.Tensor:
    """Fused conv2d + requantize (bias must already hold the folded input zero point); ``then``: a
    further elementwise step in the epilogue stage (``requant.epilogue``)."""
    acc = conv2d_acc(x, w, strides=strides, dilations=dilations, pads=pads, zin=zin, groups=groups)
    return epilogue(acc, bias, m, shift, zout, act_min, act_max, then=then)


# ---- tensorized layout: [O/nb, KH, KW, I/kb, nb, kb] (VNNI 16x4, sdot/NEON 4x4) ---------------


def pack_weight_dot(weight: np.ndarray, nb: int, kb: int) -> np.ndarray:
    """[O, KH, KW, I] -> [ceil(O/nb), KH, KW, ceil(I/kb), nb, kb], zero padded: the layout a dot-product
    intrinsic reads (``nb`` output channels x ``kb`` consecutive input channels per tile)."""
    o, kh, kw, i = weight.shape
    on, ib = -(-o // nb), -(-i // kb)
    wp = np.zeros((on * nb, kh, kw, ib * kb), weight.dtype)
    wp[:o, :, :, :i] = weight
    return np.ascontiguousarray(wp.reshape(on, nb, kh, kw, ib, kb).transpose(0, 2, 3, 4, 1, 5))


def fold_input_zero_point_dot(bias: np.ndarray, weight: np.ndarray, zin: int, unsigned: bool) -> np.ndarray:
    """``fold_input_zero_point`` for the dot-product kernels: with u8 activations (VNNI) the kernel
    reads ``x + 128`` and padded cells hold ``zin + 128``, so the bias absorbs ``(zin + 128) * sum(w)``."""
    return fold_input_zero_point(bias, weight, int(zin) + (128 if unsigned else 0))


def conv2d_dot(
    x: te.Tensor,
    wp: te.Tensor,
    bias: te.Tensor,
    m: te.Tensor,
    shift: te.Tensor,
    *,
    out_channels: int,
    act_dtype: str,
    strides,
    dilations,
    pads,
    zin: int,
    zout: int,
    act_min: int,
    act_max: int,
    narrow: bool | str = False,
    then=None,
) -> te.Tensor:
    """conv2d (groups == 1) + requantize over ``pack_weight_dot`` weights, in the shape a dot-product
    intrinsic tensorizes: ``acc[n, oh, ow, O/nb, nb]``, reduced over (kh, kw, I/kb, kb).

    Stages (names the schedule relies on): ``act`` (padded, channel padded to kb with zeros, shifted
    by +128 for u8 activations; padded cells hold ``zin`` [+128]; a plain elementwise map without
    padding, which the schedule then inlines), ``conv_acc`` and ``requant``.
    The bias must come from ``fold_input_zero_point_dot`` with the same ``unsigned``; ``narrow``: the
    32-bit epilogue (``requant.narrow_ok`` must hold); ``then``: a further elementwise step computed in
    the ``requant`` stage (a fused residual add, see ``requant.epilogue``), so the schedule is unchanged."""
    on, kh, kw, ib, nb, kb = (int(d) for d in wp.shape)
    g = window(x, (kh, kw), strides, dilations, pads)
    n, h, wd, c = g.n, g.h, g.w, g.c
    top, left, bottom, right = g.pads
    cp = ib * kb
    unsigned = act_dtype == "uint8"
    fill = tirx.const(int(zin) + (128 if unsigned else 0), act_dtype)
    zero = tirx.const(0, act_dtype)

    def act(b, i, j, ch):
        v = x[b, i - top, j - left, ch]
        if unsigned:
            v = (v.astype("int32") + 128).astype("uint8")
        if top or left or bottom or right:
            v = tirx.if_then_else(tirx.all(i >= top, i < top + h, j >= left, j < left + wd), v, fill)
        return v if cp == c else tirx.if_then_else(ch < c, v, zero)

    plain = not (top or left or bottom or right) and cp == c  # an elementwise map the schedule inlines
    xa = te.compute(
        (n, h + top + bottom, wd + left + right, cp), act, name="act", attrs={PLAIN_MAP: 1} if plain else None
    )
    rh, rw = g.reduce_axes()
    rco = te.reduce_axis((0, ib), "rco")
    rci = te.reduce_axis((0, kb), "rci")

    def f(b, i, j, ob, oi):
        y, xx = g.src(i, j, rh, rw)
        return te.sum(
            xa[b, y, xx, rco * kb + rci].astype("int32") * wp[ob, rh, rw, rco, oi, rci].astype("int32"),
            axis=[rh, rw, rco, rci],
        )

    acc = te.compute((n, g.oh, g.ow, on, nb), f, name="conv_acc")
    view = te.compute((n, g.oh, g.ow, out_channels), lambda b, i, j, oc: acc[b, i, j, oc // nb, oc % nb], name="acc")
    return epilogue(view, bias, m, shift, zout, act_min, act_max, narrow=narrow, then=then)
