"""Generated float ONNX models (deterministic weights) for the demo, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # onnxruntime 1.31 rejects the IR 14 that onnx 1.23 writes by default


class _Net:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), n))
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(
        self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str | None = "relu"
    ) -> str:
        fan_in = cin // groups * k * k
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // groups, k, k))
        y = self.node(
            "Conv",
            [x, self.const("w", w)],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=groups,
        )
        bn = [
            self.const(s, v)
            for s, v in (
                ("gamma", self.rng.uniform(0.5, 1.5, cout)),
                ("beta", self.rng.normal(0, 0.1, cout)),
                ("mean", self.rng.normal(0, 0.1, cout)),
                ("var", self.rng.uniform(0.5, 1.5, cout)),
            )
        ]
        y = self.node("BatchNormalization", [y, *bn], epsilon=1e-5)
        if act == "relu":
            y = self.node("Relu", [y])
        elif act == "relu6":
            y = self.node("Clip", [y, self.const("lo", np.array(0.0)), self.const("hi", np.array(6.0))])
        elif act == "hardswish":
            y = self.node("HardSwish", [y])
        return y

    def model(self, x: str, shape: list, out: str, classes: int, name: str) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], producer_name="edgekit.zoo")
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


def _inverted_residual(net: _Net, x: str, cin: int, cout: int, expand: int, stride: int) -> str:
    hidden = cin * expand
    y = net.conv_bn(x, cin, hidden, k=1, act="relu6") if expand != 1 else x
    y = net.conv_bn(y, hidden, hidden, k=3, stride=stride, groups=hidden, act="relu6")
    y = net.conv_bn(y, hidden, cout, k=1, act=None)
    return net.node("Add", [x, y]) if stride == 1 and cin == cout else y


def tiny_cnn(path: str | Path, seed: int = 0, size: int = 32, classes: int = 10) -> Path:
    """A small NCHW MobileNet-style classifier covering conv, depthwise, BN, ReLU/ReLU6,
    HardSwish, residual Add, MaxPool, Concat, GlobalAveragePool, Gemm and Softmax."""
    net = _Net(seed)
    x = "image"
    y = net.conv_bn(x, 3, 16, stride=2, act="hardswish")
    y = _inverted_residual(net, y, 16, 16, 1, 1)
    y = _inverted_residual(net, y, 16, 24, 4, 2)
    y = _inverted_residual(net, y, 24, 24, 4, 1)
    a = net.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    b = net.conv_bn(y, 24, 8, k=3, stride=2)
    y = net.node("Concat", [a, b], axis=1)
    y = net.node("GlobalAveragePool", [y])
    y = net.node("Flatten", [y], axis=1)
    w = net.rng.normal(0, np.sqrt(1.0 / 32), (classes, 32))
    y = net.node("Gemm", [y, net.const("fc_w", w), net.const("fc_b", net.rng.normal(0, 0.1, classes))], transB=1)
    y = net.node("Softmax", [y], axis=1)
    m = net.model(x, ["N", 3, size, size], y, classes, "tiny_cnn")
    onnx.save(m, str(path))
    return Path(path)


def mobilenet_v2_like(
    path: str | Path, seed: int = 0, size: int = 224, classes: int = 1000, width: float = 1.0
) -> Path:
    """A MobileNetV2-shaped network (the real layer shapes, generated weights)."""

    def c(ch: int) -> int:
        return max(8, int(ch * width + 4) // 8 * 8)

    net = _Net(seed)
    x = "image"
    y = net.conv_bn(x, 3, c(32), stride=2, act="relu6")
    cin = c(32)
    for t, ch, n, s in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        for i in range(n):
            y = _inverted_residual(net, y, cin, c(ch), t, s if i == 0 else 1)
            cin = c(ch)
    y = net.conv_bn(y, cin, 1280, k=1, act="relu6")
    y = net.node("GlobalAveragePool", [y])
    y = net.node("Flatten", [y], axis=1)
    w = net.rng.normal(0, np.sqrt(1.0 / 1280), (classes, 1280))
    y = net.node("Gemm", [y, net.const("fc_w", w), net.const("fc_b", np.zeros(classes))], transB=1)
    m = net.model(x, ["N", 3, size, size], y, classes, "mobilenet_v2_like")
    onnx.save(m, str(path))
    return Path(path)


def synthetic_images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    """Smooth random NCHW images in [0, 1] (low-frequency noise, like natural images)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 3, size // 4, size // 4)).astype(np.float32)
    img = coarse.repeat(4, axis=2).repeat(4, axis=3)
    return np.clip(img + rng.normal(0, 0.05, img.shape).astype(np.float32), 0, 1)
