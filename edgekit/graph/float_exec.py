"""A numpy float executor for the IR: checks the import, feeds calibration."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgekit.graph.ir import Graph, Node

Env = dict[str, np.ndarray]


def _windows(x: np.ndarray, kernel, strides, dilations, pads, fill: float) -> np.ndarray:
    top, left, bottom, right = pads
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    kh, kw = kernel
    dh, dw = dilations
    win = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    return win[:, :: strides[0], :: strides[1], :, ::dh, ::dw]


def _act(y: np.ndarray, node: Node) -> np.ndarray:
    act = node.attrs.get("activation")
    return y if act is None else np.clip(y, act[0], act[1])


def conv2d(node: Node, x: np.ndarray) -> np.ndarray:
    a = node.attrs
    w = a["weight"]
    o, kh, kw, ipg = w.shape
    win = _windows(x, (kh, kw), a["strides"], a["dilations"], a["pads"], 0.0)
    n, oh, ow, c = win.shape[:4]
    g = a["groups"]
    if g == 1:
        cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c)
        y = cols @ w.reshape(o, -1).T
    elif ipg == 1 and g == c:
        y = np.einsum("nhwcij,cmij->nhwcm", win, w.reshape(c, o // c, kh, kw), optimize=True).reshape(-1, o)
    else:
        opg = o // g
        y = np.concatenate(
            [
                win[:, :, :, i * ipg : (i + 1) * ipg].transpose(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, -1)
                @ w[i * opg : (i + 1) * opg].reshape(opg, -1).T
                for i in range(g)
            ],
            axis=1,
        )
    y = y + a["bias"]
    return _act(y.reshape(n, oh, ow, o).astype(np.float32), node)


def dense(node: Node, x: np.ndarray) -> np.ndarray:
    y = x @ node.attrs["weight"].T + node.attrs["bias"]
    return _act(y.astype(np.float32), node)


def maxpool(node: Node, x: np.ndarray) -> np.ndarray:
    a = node.attrs
    return _windows(x, a["kernel"], a["strides"], (1, 1), a["pads"], -np.inf).max(axis=(4, 5))


def avgpool(node: Node, x: np.ndarray) -> np.ndarray:
    a = node.attrs
    s = _windows(x, a["kernel"], a["strides"], (1, 1), a["pads"], 0.0).sum(axis=(4, 5))
    ones = np.ones((1,) + x.shape[1:3] + (1,), np.float32)
    cnt = _windows(ones, a["kernel"], a["strides"], (1, 1), a["pads"], 0.0).sum(axis=(4, 5))
    return (s / cnt).astype(np.float32)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def hardswish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def reshape(node: Node, x: np.ndarray) -> np.ndarray:
    if node.attrs["shape"] is None:
        return x
    return x.reshape([x.shape[0] if d is None else d for d in node.attrs["shape"]])


OPS: dict[str, Callable[[Node, list[np.ndarray]], np.ndarray]] = {
    "conv2d": lambda n, xs: conv2d(n, xs[0]),
    "dense": lambda n, xs: dense(n, xs[0]),
    "add": lambda n, xs: _act(xs[0] + xs[1], n),
    "mul": lambda n, xs: xs[0] * xs[1],
    "relu": lambda n, xs: np.maximum(xs[0], 0),
    "clip": lambda n, xs: np.clip(xs[0], n.attrs["min"], n.attrs["max"]),
    "sigmoid": lambda n, xs: sigmoid(xs[0]),
    "hardswish": lambda n, xs: hardswish(xs[0]),
    "maxpool": lambda n, xs: maxpool(n, xs[0]),
    "avgpool": lambda n, xs: avgpool(n, xs[0]),
    "concat": lambda n, xs: np.concatenate(xs, axis=n.attrs["axis"]),
    "reshape": lambda n, xs: reshape(n, xs[0]),
    "transpose": lambda n, xs: np.transpose(xs[0], n.attrs["perm"]),
    "pad": lambda n, xs: np.pad(xs[0], n.attrs["pads"], constant_values=n.attrs.get("value", 0.0)),
    "softmax": lambda n, xs: softmax(xs[0], n.attrs["axis"]),
}


def run_graph(graph: Graph, feeds: dict[str, np.ndarray], keep: set[str] | None = None) -> Env:
    """Run the float graph; returns graph outputs plus the tensors named in ``keep``
    (all tensors when ``keep`` is None)."""
    env: Env = {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()}
    env.update(graph.constants)
    last_use: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            last_use[t] = i
    for i, n in enumerate(graph.nodes):
        y = OPS[n.op](n, [env[t] for t in n.inputs])
        env[n.outputs[0]] = np.asarray(y, dtype=np.float32)
        if keep is not None:
            for t in n.inputs:
                if last_use.get(t) == i and t not in keep and t not in graph.outputs and t not in graph.constants:
                    env.pop(t, None)
    return env


def infer_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every tensor for a batch of one."""
    feeds = {}
    for name in graph.inputs:
        shape = [1 if d is None else d for d in graph.input_shapes[name]]
        feeds[name] = np.zeros(shape, np.float32)
    env = run_graph(graph, feeds)
    return {k: tuple(v.shape) for k, v in env.items()}
