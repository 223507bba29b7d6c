"""Fully connected (last axis) int8 x int8 -> int32 + requantize, plain [O, K] and packed
[O/16, K/4, 16, 4] (the VNNI / sdot-friendly block layout) weights."""

from __future__ import annotations

import numpy as np
from tvm import te

from kernels.requant import epilogue


def dense(
    x: te.Tensor,
    w: te.Tensor,
    bias: te.Tensor,
    m: te.Tensor,
    shift: te.Tensor,
    *,
    zout: int,
    act_min: int,
    act_max: int,
) -> te.Tensor:
    """x [M, K] int8, w [O, K] int8, bias holds the folded input zero point."""
    mm, k = (int(d) for d in x.shape)
    o = int(w.shape[0])
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute(
        (mm, o), lambda i, j: te.sum(x[i, rk].astype("int32") * w[j, rk].astype("int32"), axis=rk), name="dense_acc"
    )
    return epilogue(acc, bias, m, shift, zout, act_min, act_max)


def pack_weight_nk(weight: np.ndarray, nb: int = 16, kb: int = 4) -> np.ndarray:
    """[O, K] -> [ceil(O/nb), ceil(K/kb), nb, kb], zero padded."""
    o, k = weight.shape
    on, kn = -(-o // nb), -(-k // kb)
    wp = np.zeros((on * nb, kn * kb), weight.dtype)
    wp[:o, :k] = weight
    return np.ascontiguousarray(wp.reshape(on, nb, kn, kb).transpose(0, 2, 1, 3))


def dense_packed(
    x: te.Tensor,
    wp: te.Tensor,
    bias: te.Tensor,
    m: te.Tensor,
    shift: te.Tensor,
    *,
    out_features: int,
    zout: int,
    act_min: int,
    act_max: int,
) -> te.Tensor:
    """dense over ``pack_weight_nk`` weights; K is padded with zeros (x padded too)."""
    mm, k = (int(d) for d in x.shape)
    _, kn, nb, kb = (int(d) for d in wp.shape)
    kp = kn * kb
    if kp != k:
        xpad = te.compute((mm, kp), lambda i, kk: te.if_then_else(kk < k, x[i, kk], te.const(0, x.dtype)), name="xpad")
    else:
        xpad = x
    rk = te.reduce_axis((0, kp), "rk")
    acc = te.compute(
        (mm, out_features),
        lambda i, j: te.sum(
            xpad[i, rk].astype("int32") * wp[j // nb, rk // kb, j % nb, rk % kb].astype("int32"), axis=rk
        ),
        name="dense_acc",
    )
    return epilogue(acc, bias, m, shift, zout, act_min, act_max)
