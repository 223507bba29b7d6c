"""A differentiable copy of a float IR ``Graph`` as a torch module (for Hessian traces).

Tensors stay channels-last (NHWC) as in the IR, so reshape/transpose/concat attributes mean the
same thing; conv and pooling permute to NCHW around the torch call. torch is an optional extra
(``pip install edgekit[torch]``): it is imported inside the functions that need it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.graph.ir import Graph, Node

WEIGHTED_OPS = ("conv2d", "dense")


class TorchUnavailableError(EdgekitError):
    """torch is needed for Hessian sensitivities but is not installed."""


def require_torch() -> Any:
    """Import torch (one thread: the machines are shared) or say how to get it."""
    try:
        import torch
    except ImportError as exc:
        raise TorchUnavailableError(
            "Hessian sensitivities need PyTorch: pip install 'edgekit[torch]' (CPU build torch==2.13.0), "
            "or use the measured sensitivity (--sensitivity measured; method='measured')"
        ) from exc
    torch.set_num_threads(1)
    return torch


def weighted_layers(graph: Graph) -> list[Node]:
    """The conv2d / dense nodes: the layers whose weight bit width is chosen."""
    return [n for n in graph.nodes if n.op in WEIGHTED_OPS]


def to_torch(graph: Graph, logits: bool = True) -> Any:
    """A ``torch.nn.Module`` computing ``graph`` in float32; ``logits`` drops a softmax at an output.

    The module's ``weights`` (a ParameterList) hold the conv/dense weights in IR layout, in the
    order of ``module.layer_names``; biases are buffers (not differentiated).
    """
    torch = require_torch()
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    supported = {
        "conv2d",
        "dense",
        "add",
        "mul",
        "relu",
        "clip",
        "sigmoid",
        "hardswish",
        "maxpool",
        "avgpool",
        "concat",
        "reshape",
        "transpose",
        "pad",
        "softmax",
    }
    bad = [(n.op, n.name) for n in graph.nodes if n.op not in supported]
    if bad:
        from edgekit.errors import UnsupportedOpsError

        raise UnsupportedOpsError(bad, context="the torch converter (Hessian sensitivity)")

    def act(y: Any, node: Node) -> Any:
        a = node.attrs.get("activation")
        if a is None:
            return y
        lo = None if not np.isfinite(a[0]) else float(a[0])
        hi = None if not np.isfinite(a[1]) else float(a[1])
        return torch.clamp(y, min=lo, max=hi)

    def windows_pad(x: Any, pads: list[int], fill: float) -> Any:
        top, left, bottom, right = pads
        return F.pad(x, (left, right, top, bottom), value=fill) if any(pads) else x

    class GraphModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer_names = [n.name for n in weighted_layers(graph)]
            self.index = {name: i for i, name in enumerate(self.layer_names)}
            self.weights = nn.ParameterList(
                [nn.Parameter(torch.tensor(np.asarray(n.attrs["weight"], np.float32))) for n in weighted_layers(graph)]
            )
            for i, n in enumerate(weighted_layers(graph)):
                self.register_buffer(f"bias{i}", torch.tensor(np.asarray(n.attrs["bias"], np.float32)))
            for i, v in enumerate(graph.constants.values()):
                self.register_buffer(f"const{i}", torch.tensor(np.asarray(v, np.float32)))
            self.const_names = {k: f"const{i}" for i, k in enumerate(graph.constants)}
            self.skip_softmax = {
                n.outputs[0] for n in graph.nodes if n.op == "softmax" and logits and n.outputs[0] in graph.outputs
            }

        def forward(self, *inputs: Any) -> Any:
            env: dict[str, Any] = dict(zip(graph.inputs, inputs, strict=True))
            for k, b in self.const_names.items():
                env[k] = getattr(self, b)
            for n in graph.nodes:
                xs = [env[t] for t in n.inputs]
                env[n.outputs[0]] = self._op(n, xs)
            outs = [env[o] for o in graph.outputs]
            return outs[0] if len(outs) == 1 else tuple(outs)

        def _op(self, n: Node, xs: list[Any]) -> Any:
            a = n.attrs
            if n.op == "conv2d":
                i = self.index[n.name]
                w = self.weights[i].permute(0, 3, 1, 2)
                x = windows_pad(xs[0].permute(0, 3, 1, 2), a["pads"], 0.0)
                y = F.conv2d(
                    x,
                    w,
                    getattr(self, f"bias{i}"),
                    stride=tuple(a["strides"]),
                    dilation=tuple(a["dilations"]),
                    groups=a["groups"],
                )
                return act(y.permute(0, 2, 3, 1), n)
            if n.op == "dense":
                i = self.index[n.name]
                return act(xs[0] @ self.weights[i].t() + getattr(self, f"bias{i}"), n)
            if n.op == "add":
                return act(xs[0] + xs[1], n)
            if n.op == "mul":
                return xs[0] * xs[1]
            if n.op == "relu":
                return torch.relu(xs[0])
            if n.op == "clip":
                return torch.clamp(xs[0], float(a["min"]), float(a["max"]))
            if n.op == "sigmoid":
                return torch.sigmoid(xs[0])
            if n.op == "hardswish":
                return xs[0] * torch.clamp(xs[0] + 3.0, 0.0, 6.0) / 6.0
            if n.op in ("maxpool", "avgpool"):
                x = xs[0].permute(0, 3, 1, 2)
                k, s = tuple(a["kernel"]), tuple(a["strides"])
                if n.op == "maxpool":
                    y = F.max_pool2d(windows_pad(x, a["pads"], float("-inf")), k, s)
                else:  # padding never counts
                    total = F.avg_pool2d(windows_pad(x, a["pads"], 0.0), k, s, divisor_override=1)
                    ones = windows_pad(torch.ones_like(x[:1, :1]), a["pads"], 0.0)
                    y = total / F.avg_pool2d(ones, k, s, divisor_override=1)
                return y.permute(0, 2, 3, 1)
            if n.op == "concat":
                return torch.cat(xs, dim=a["axis"])
            if n.op == "reshape":
                if a["shape"] is None:
                    return xs[0]
                return xs[0].reshape([xs[0].shape[0] if d is None else d for d in a["shape"]])
            if n.op == "transpose":
                return xs[0].permute(*a["perm"])
            if n.op == "pad":
                flat: list[int] = []
                for before, after in reversed([tuple(p) for p in a["pads"]]):
                    flat += [int(before), int(after)]
                return F.pad(xs[0], tuple(flat), value=float(a.get("value", 0.0)))
            if n.op == "softmax":
                return xs[0] if n.outputs[0] in self.skip_softmax else torch.softmax(xs[0], dim=a["axis"])
            raise AssertionError(n.op)

    return GraphModule()
