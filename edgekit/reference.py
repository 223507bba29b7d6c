"""The reference executor: the specification every other path is checked against.

Each operator is one small function over integer numpy arrays, in NHWC layout. Apart from
``quantize`` at a graph input and the output epilogue (dequantize, softmax) nothing here
touches a float value: products are exact integer products (``exact_int_matmul``), every
rescale goes through ``arith.requantize``, and averages through a multiply and a shift.

Only numpy is imported (with ``edgekit.qmodel`` and ``edgekit.quant.arith``), so the agent
can run this file on a device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgekit.qmodel import QNode, QuantModel
from edgekit.quant import arith

Env = dict[str, np.ndarray]


def _i64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def _clamp_i8(x: np.ndarray, attrs: dict) -> np.ndarray:
    return np.clip(x, attrs.get("act_min", -128), attrs.get("act_max", 127)).astype(np.int8)


def _windows(x: np.ndarray, kernel, strides, dilations, pads, fill: int) -> np.ndarray:
    """[N, OH, OW, C, KH, KW] view of the padded NHWC input."""
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    kh, kw = kernel
    dh, dw = dilations
    eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = sliding_window_view(x, (eff_h, eff_w), axis=(1, 2))
    win = win[:, :: strides[0], :: strides[1], :, ::dh, ::dw]
    return win


def op_quantize(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    info = qm.tensors[node.outputs[0]]
    x = np.asarray(env[node.inputs[0]])
    if x.dtype == np.int8:  # already quantized by the caller
        return x
    q = arith.round_half_away(np.float32(x) / np.float32(info.scale)) + info.zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def conv2d_accumulators(qm: QuantModel, node: QNode, xq: np.ndarray) -> np.ndarray:
    """The int32 accumulators of a conv2d (bias included), [N, OH, OW, O] as int64."""
    a = node.attrs
    zin = qm.tensors[node.inputs[0]].zero_point
    w = _i64(qm.constants[node.params["weight"]])  # [O, KH, KW, I/g]
    o, kh, kw, ipg = w.shape
    # |x - zin| <= 255 and |w| <= 127: every partial sum is an integer below 2**53, exact in float64
    x = np.asarray(xq, dtype=np.float64) - zin
    win = _windows(x, (kh, kw), a["strides"], a["dilations"], a["pads"], 0)  # [N,OH,OW,C,KH,KW]
    n, oh, ow, c = win.shape[:4]
    g = a["groups"]
    bound = 255 * 128 * kh * kw * ipg
    if g == 1:
        cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c)
        acc = arith.exact_int_matmul(cols, w.reshape(o, -1).T, bound)
    elif ipg == 1 and g == c:  # depthwise, channel multiplier o // c
        mult = o // c
        wd = w.reshape(c, mult, kh, kw).astype(np.float64)
        acc = np.einsum("nhwcij,cmij->nhwcm", win.astype(np.float64), wd, optimize=True)
        acc = acc.astype(np.int64).reshape(n * oh * ow, o)
    else:
        opg = o // g
        parts = []
        for gi in range(g):
            wg = win[:, :, :, gi * ipg : (gi + 1) * ipg]
            cols = wg.transpose(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * ipg)
            parts.append(arith.exact_int_matmul(cols, w[gi * opg : (gi + 1) * opg].reshape(opg, -1).T, bound))
        acc = np.concatenate(parts, axis=1)
    return (acc + _i64(qm.constants[node.params["bias"]])).reshape(n, oh, ow, o)


def dense_accumulators(qm: QuantModel, node: QNode, xq: np.ndarray) -> np.ndarray:
    """The int32 accumulators of a dense layer (bias included), as int64."""
    zin = qm.tensors[node.inputs[0]].zero_point
    x = _i64(xq) - zin
    w = _i64(qm.constants[node.params["weight"]])
    acc = arith.exact_int_matmul(x.reshape(-1, x.shape[-1]), w.T) + _i64(qm.constants[node.params["bias"]])
    return acc.reshape(*x.shape[:-1], w.shape[0])


def _requantize_out(qm: QuantModel, node: QNode, acc: np.ndarray) -> np.ndarray:
    zout = qm.tensors[node.outputs[0]].zero_point
    y = arith.requantize(acc, qm.constants[node.params["multiplier"]], qm.constants[node.params["shift"]]) + zout
    return _clamp_i8(y, node.attrs)


def op_conv2d(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    return _requantize_out(qm, node, conv2d_accumulators(qm, node, env[node.inputs[0]]))


def op_dense(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    return _requantize_out(qm, node, dense_accumulators(qm, node, env[node.inputs[0]]))


def op_add(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    a = node.attrs
    ta, tb = (qm.tensors[i] for i in node.inputs)
    zout = qm.tensors[node.outputs[0]].zero_point
    xa = np.left_shift(_i64(env[node.inputs[0]]) - ta.zero_point, a["left_shift"])
    xb = np.left_shift(_i64(env[node.inputs[1]]) - tb.zero_point, a["left_shift"])
    sa = arith.requantize(xa, a["multiplier_a"], a["shift_a"])
    sb = arith.requantize(xb, a["multiplier_b"], a["shift_b"])
    y = arith.requantize(sa + sb, a["multiplier"], a["shift"]) + zout
    return _clamp_i8(y, a)


def op_mul(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    a = node.attrs
    ta, tb = (qm.tensors[i] for i in node.inputs)
    zout = qm.tensors[node.outputs[0]].zero_point
    prod = (_i64(env[node.inputs[0]]) - ta.zero_point) * (_i64(env[node.inputs[1]]) - tb.zero_point)
    return _clamp_i8(arith.requantize(prod, a["multiplier"], a["shift"]) + zout, a)


def op_requantize(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    a = node.attrs
    zin = qm.tensors[node.inputs[0]].zero_point
    zout = qm.tensors[node.outputs[0]].zero_point
    y = arith.requantize(_i64(env[node.inputs[0]]) - zin, a["multiplier"], a["shift"]) + zout
    return _clamp_i8(y, a)


def op_maxpool(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    a = node.attrs
    win = _windows(env[node.inputs[0]], a["kernel"], a["strides"], (1, 1), a["pads"], -128)
    return _clamp_i8(win.max(axis=(4, 5)), a)


def op_avgpool(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    a = node.attrs
    x = _i64(env[node.inputs[0]])
    win = _windows(x, a["kernel"], a["strides"], (1, 1), a["pads"], 0)
    acc = win.sum(axis=(4, 5))
    ones = np.ones((1,) + x.shape[1:3] + (1,), dtype=np.int64)
    count = _windows(ones, a["kernel"], a["strides"], (1, 1), a["pads"], 0).sum(axis=(4, 5))
    kh, kw = a["kernel"]
    y = arith.rounded_average(acc, np.broadcast_to(count, acc.shape), 128 * kh * kw)
    return _clamp_i8(y, a)


def op_concat(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    a = node.attrs
    zout = qm.tensors[node.outputs[0]].zero_point
    parts = []
    for name, m, s in zip(node.inputs, a["multipliers"], a["shifts"], strict=True):
        x = env[name]
        if m is None:  # same scale and zero point: a copy
            parts.append(_i64(x))
        else:
            zin = qm.tensors[name].zero_point
            parts.append(arith.requantize(_i64(x) - zin, m, s) + zout)
    return np.clip(np.concatenate(parts, axis=a["axis"]), -128, 127).astype(np.int8)


def op_pad(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    zout = qm.tensors[node.outputs[0]].zero_point
    return np.pad(env[node.inputs[0]], node.attrs["pads"], constant_values=zout).astype(np.int8)


def op_reshape(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    x = env[node.inputs[0]]
    if node.attrs["shape"] is None:
        return x
    shape = [x.shape[0] if d is None else d for d in node.attrs["shape"]]
    return x.reshape(shape)


def op_transpose(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(env[node.inputs[0]], node.attrs["perm"]))


def op_lut(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    table = qm.constants[node.params["table"]]
    return table[_i64(env[node.inputs[0]]) + 128].astype(np.int8)


def op_clamp(qm: QuantModel, node: QNode, env: Env) -> np.ndarray:
    return _clamp_i8(env[node.inputs[0]], node.attrs)


OPS: dict[str, Callable[[QuantModel, QNode, Env], np.ndarray]] = {
    "quantize": op_quantize,
    "conv2d": op_conv2d,
    "dense": op_dense,
    "add": op_add,
    "mul": op_mul,
    "requantize": op_requantize,
    "maxpool": op_maxpool,
    "avgpool": op_avgpool,
    "concat": op_concat,
    "pad": op_pad,
    "reshape": op_reshape,
    "transpose": op_transpose,
    "lut": op_lut,
    "clamp": op_clamp,
}


def _feed(qm: QuantModel, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(x, dict):
        return {k: np.asarray(v) for k, v in x.items()}
    if len(qm.inputs) != 1:
        raise ValueError(f"model has {len(qm.inputs)} inputs {qm.inputs}: pass a dict")
    return {qm.inputs[0]: np.asarray(x)}


def _run_chunk(qm: QuantModel, feeds: dict[str, np.ndarray], keep_all: bool) -> Env:
    env: Env = dict(feeds)
    for c in qm.constants:
        if c in qm.tensors:  # constant operand of an elementwise op
            env[c] = qm.constants[c]
    for node in qm.nodes:
        env[node.outputs[0]] = OPS[node.op](qm, node, env)
    return env


def epilogue(qm: QuantModel, name: str, q: np.ndarray) -> np.ndarray:
    """The float tail of an output: dequantize (then softmax where the float model had it)."""
    spec = next(o for o in qm.outputs if o.name == name)
    info = qm.tensors[name]
    y = (q.astype(np.int32) - info.zero_point).astype(np.float32) * np.float32(info.scale)
    if "softmax" in spec.epilogue:
        y = y - y.max(axis=spec.softmax_axis, keepdims=True)
        e = np.exp(y)
        y = e / e.sum(axis=spec.softmax_axis, keepdims=True)
    return y


def execute(qm: QuantModel, x, *, integer_outputs: bool = False, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run ``qm`` on a batch; returns {output name: array}."""
    feeds = _feed(qm, x)
    n = next(iter(feeds.values())).shape[0]
    chunks: dict[str, list[np.ndarray]] = {o.name: [] for o in qm.outputs}
    for start in range(0, max(n, 1), batch_size):
        part = {k: v[start : start + batch_size] for k, v in feeds.items()}
        env = _run_chunk(qm, part, keep_all=False)
        for o in qm.outputs:
            chunks[o.name].append(env[o.name])
    out = {k: np.concatenate(v) for k, v in chunks.items()}
    if integer_outputs:
        return out
    return {k: epilogue(qm, k, v) for k, v in out.items()}


def execute_all(qm: QuantModel, x) -> dict[str, np.ndarray]:
    """Every tensor of the integer graph (inputs, intermediates, outputs) for one batch."""
    return _run_chunk(qm, _feed(qm, x), keep_all=True)
