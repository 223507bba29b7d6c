"""Synthetic QuantModels with random weights, for tests and benchmarks of the compiler:
ResNet-8 (MLPerf Tiny) shaped, MobileNetV2 shaped, and one that uses every operator.

Rescales are chosen from the expected accumulator spread so activations stay in range,
which exercises the rounding paths instead of saturating everything.
"""

from __future__ import annotations

import math

import numpy as np

from edgekit.qmodel import OutputSpec, QNode, QuantModel, TensorInfo
from edgekit.quant.arith import quantize_multiplier


class GraphBuilder:
    """Builds a QuantModel node by node, tracking NHWC shapes."""

    def __init__(self, name: str, seed: int = 0, weight_bits: int = 8):
        self.rng = np.random.default_rng(seed)
        self.bits = weight_bits
        self.qm = QuantModel(name=name, inputs=[], outputs=[], tensors={}, nodes=[], constants={})
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._n = 0

    def _t(self, prefix: str, shape: tuple[int, ...], zp: int | None = None, scale: float = 0.05) -> str:
        self._n += 1
        name = f"{prefix}_{self._n}"
        zp = int(self.rng.integers(-20, 20)) if zp is None else zp
        self.qm.tensors[name] = TensorInfo(name, [None, *shape[1:]], "int8", scale, zp)
        self.shapes[name] = shape
        return name

    def _const(self, name: str, arr: np.ndarray, bits: int = 0) -> str:
        self.qm.constants[name] = arr
        if bits == 4:
            self.qm.constant_bits[name] = 4
        return name

    def _rescale(self, o: int, k: int, wstd: float) -> tuple[np.ndarray, np.ndarray]:
        ms, ss = [], []
        for _ in range(o):
            real = 45.0 / (math.sqrt(k) * 45.0 * wstd) * float(self.rng.uniform(0.6, 1.6))
            m, s = quantize_multiplier(real)
            ms.append(m)
            ss.append(s)
        return np.array(ms, np.int32), np.array(ss, np.int32)

    def input(self, shape: tuple[int, ...]) -> str:
        name = "input"
        self.qm.tensors[name] = TensorInfo(name, [None, *shape[1:]], "float32")
        self.qm.inputs.append(name)
        q = self._t("input_q", shape, zp=-128, scale=1.0)
        self.qm.nodes.append(QNode("quantize", "quantize", [name], [q]))
        return q

    def conv(
        self,
        x: str,
        o: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        relu: bool = True,
        bits: int | None = None,
        pad: str = "same",
    ) -> str:
        n, h, w, c = self.shapes[x]
        bits = self.bits if bits is None else bits
        lim = 7 if bits == 4 else 127
        ipg = c // groups
        wt = self.rng.integers(-lim, lim + 1, size=(o, k, k, ipg)).astype(np.int8)
        if pad == "same":
            total = max((math.ceil(h / stride) - 1) * stride + k - h, 0)
            pads = [total // 2, total // 2, total - total // 2, total - total // 2]
        else:
            pads = [0, 0, 0, 0]
        oh = (h + pads[0] + pads[2] - k) // stride + 1
        ow = (w + pads[1] + pads[3] - k) // stride + 1
        y = self._t("conv", (n, oh, ow, o))
        m, s = self._rescale(o, k * k * ipg, lim / 1.7)
        i = len(self.qm.nodes)
        bias = self.rng.integers(-2000, 2000, size=o).astype(np.int32)
        params = {
            "weight": self._const(f"w{i}", wt, bits),
            "bias": self._const(f"b{i}", bias),
            "multiplier": self._const(f"m{i}", m),
            "shift": self._const(f"s{i}", s),
        }
        zout = self.qm.tensors[y].zero_point
        attrs = {
            "strides": [stride, stride],
            "dilations": [1, 1],
            "pads": pads,
            "groups": groups,
            "weight_bits": bits,
            "act_min": zout if relu else -128,
            "act_max": 127,
        }
        self.qm.nodes.append(QNode("conv2d", f"conv{i}", [x], [y], attrs, params))
        return y

    def add(self, a: str, b: str, relu: bool = True) -> str:
        y = self._t("add", self.shapes[a])
        zout = self.qm.tensors[y].zero_point
        ma, sa = quantize_multiplier(0.5 * float(self.rng.uniform(0.7, 1.0)))
        mb, sb = quantize_multiplier(0.5 * float(self.rng.uniform(0.7, 1.0)))
        mo, so = quantize_multiplier(2.0**-20 * 1.3)
        attrs = {
            "left_shift": 20,
            "multiplier_a": ma,
            "shift_a": sa,
            "multiplier_b": mb,
            "shift_b": sb,
            "multiplier": mo,
            "shift": so,
            "act_min": zout if relu else -128,
            "act_max": 127,
        }
        self.qm.nodes.append(QNode("add", f"add{len(self.qm.nodes)}", [a, b], [y], attrs))
        return y

    def avgpool(self, x: str, k: int, stride: int, pads=(0, 0, 0, 0)) -> str:
        n, h, w, c = self.shapes[x]
        oh = (h + pads[0] + pads[2] - k) // stride + 1
        ow = (w + pads[1] + pads[3] - k) // stride + 1
        y = self._t("avgpool", (n, oh, ow, c), zp=self.qm.tensors[x].zero_point)
        attrs = {"kernel": [k, k], "strides": [stride, stride], "pads": list(pads)}
        self.qm.nodes.append(QNode("avgpool", f"avgpool{len(self.qm.nodes)}", [x], [y], attrs))
        return y

    def maxpool(self, x: str, k: int, stride: int, pads=(0, 0, 0, 0)) -> str:
        n, h, w, c = self.shapes[x]
        oh = (h + pads[0] + pads[2] - k) // stride + 1
        ow = (w + pads[1] + pads[3] - k) // stride + 1
        y = self._t("maxpool", (n, oh, ow, c), zp=self.qm.tensors[x].zero_point)
        attrs = {"kernel": [k, k], "strides": [stride, stride], "pads": list(pads)}
        self.qm.nodes.append(QNode("maxpool", f"maxpool{len(self.qm.nodes)}", [x], [y], attrs))
        return y

    def reshape(self, x: str, shape: list[int | None]) -> str:
        full = (self.shapes[x][0], *[int(d) for d in shape[1:]])
        y = self._t("reshape", full, zp=self.qm.tensors[x].zero_point)
        self.qm.nodes.append(QNode("reshape", f"reshape{len(self.qm.nodes)}", [x], [y], {"shape": list(shape)}))
        return y

    def dense(self, x: str, o: int, relu: bool = False, bits: int | None = None) -> str:
        shp = self.shapes[x]
        k = shp[-1]
        bits = self.bits if bits is None else bits
        lim = 7 if bits == 4 else 127
        wt = self.rng.integers(-lim, lim + 1, size=(o, k)).astype(np.int8)
        y = self._t("dense", (*shp[:-1], o))
        m, s = self._rescale(o, k, lim / 1.7)
        i = len(self.qm.nodes)
        params = {
            "weight": self._const(f"w{i}", wt, bits),
            "bias": self._const(f"b{i}", self.rng.integers(-2000, 2000, size=o).astype(np.int32)),
            "multiplier": self._const(f"m{i}", m),
            "shift": self._const(f"s{i}", s),
        }
        zout = self.qm.tensors[y].zero_point
        attrs = {"weight_bits": bits, "act_min": zout if relu else -128, "act_max": 127}
        self.qm.nodes.append(QNode("dense", f"dense{i}", [x], [y], attrs, params))
        return y

    def simple(
        self, op: str, x: str, attrs: dict, shape: tuple[int, ...] | None = None, inputs=None, params=None
    ) -> str:
        y = self._t(op, shape or self.shapes[x])
        self.qm.nodes.append(QNode(op, f"{op}{len(self.qm.nodes)}", inputs or [x], [y], attrs, params or {}))
        return y

    def output(self, x: str, softmax: bool = True) -> QuantModel:
        self.qm.outputs.append(OutputSpec(x, ["dequantize", "softmax"] if softmax else ["dequantize"]))
        return self.qm


def resnet8(seed: int = 0, weight_bits: int = 8, batch: int = 1) -> QuantModel:
    """MLPerf Tiny ResNet-8 topology (32x32x3 -> 10) with random weights."""
    g = GraphBuilder(f"resnet8_synth_w{weight_bits}", seed, weight_bits)
    x = g.input((batch, 32, 32, 3))
    x = g.conv(x, 16, 3)
    for o, s in ((16, 1), (32, 2), (64, 2)):
        y = g.conv(x, o, 3, s)
        y = g.conv(y, o, 3, 1, relu=False)
        sc = x if s == 1 and o == g.shapes[x][-1] else g.conv(x, o, 1, s, relu=False)
        x = g.add(y, sc)
    x = g.avgpool(x, 8, 8)
    x = g.reshape(x, [None, 64])
    x = g.dense(x, 10)
    return g.output(x)


def mobilenetv2(seed: int = 0, weight_bits: int = 8, size: int = 224, width: float = 1.0) -> QuantModel:
    """MobileNetV2-shaped (inverted residuals, depthwise 3x3, ReLU6-like clamps) with random weights."""
    g = GraphBuilder(f"mobilenetv2_synth_{size}", seed, weight_bits)

    def ch(c: int) -> int:
        return max(8, int(c * width + 4) // 8 * 8)

    x = g.input((1, size, size, 3))
    x = g.conv(x, ch(32), 3, 2)
    cin = ch(32)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    for t, c, n, s in cfg:
        for i in range(n):
            stride = s if i == 0 else 1
            hid = cin * t
            y = x if t == 1 else g.conv(x, hid, 1)
            y = g.conv(y, hid, 3, stride, groups=hid)
            y = g.conv(y, ch(c), 1, relu=False)
            x = g.add(y, x, relu=False) if stride == 1 and cin == ch(c) else y
            cin = ch(c)
    x = g.conv(x, 1280, 1)
    hw = g.shapes[x][1]
    x = g.avgpool(x, hw, hw)
    x = g.reshape(x, [None, 1280])
    x = g.dense(x, 1000)
    return g.output(x)


def all_ops(seed: int = 0, weight_bits: int = 8) -> QuantModel:
    """A small graph touching every operator the compiler supports (including odd pads, grouped
    and depthwise-multiplier convs, broadcast mul with a constant, concat with a rescale)."""
    g = GraphBuilder("all_ops", seed, weight_bits)
    rng = g.rng
    x = g.input((2, 9, 11, 8))
    a = g.conv(x, 16, 3, 2)
    b = g.conv(a, 32, 3, 1, groups=16)  # depthwise, multiplier 2
    c = g.conv(b, 32, 1, groups=4)  # grouped
    d = g.conv(c, 32, 2, 1, pad="valid", bits=4)
    m1, s1 = quantize_multiplier(0.8)
    e = g.simple("requantize", d, {"multiplier": m1, "shift": s1, "act_min": -100, "act_max": 120})
    f = g.maxpool(e, 3, 2, pads=(1, 1, 1, 1))
    h = g.avgpool(e, 3, 2, pads=(1, 1, 1, 1))
    cst = "mulconst"
    g.qm.tensors[cst] = TensorInfo(cst, [32], "int8", 0.01, 3)
    g.qm.constants[cst] = rng.integers(-128, 128, size=(32,)).astype(np.int8)
    mm, ms = quantize_multiplier(0.003)
    k = g.simple("mul", h, {"multiplier": mm, "shift": ms, "act_min": -128, "act_max": 127}, inputs=[h, cst])
    cm, cs = quantize_multiplier(1.7)
    cat_shape = (*g.shapes[f][:3], 64)
    cat = g.simple("concat", f, {"axis": 3, "multipliers": [None, cm], "shifts": [None, cs]}, cat_shape, [f, k])
    g.qm.tensors[cat].zero_point = g.qm.tensors[f].zero_point
    p = g.simple(
        "pad", cat, {"pads": [[0, 0], [1, 0], [0, 2], [0, 0]]}, (cat_shape[0], cat_shape[1] + 1, cat_shape[2] + 2, 64)
    )
    t = g.simple("transpose", p, {"perm": [0, 2, 1, 3]}, (cat_shape[0], cat_shape[2] + 2, cat_shape[1] + 1, 64))
    table = rng.integers(-128, 128, size=256).astype(np.int8)
    g.qm.constants["lut_table"] = table
    lu = g.simple("lut", t, {"function": "random"}, params={"table": "lut_table"})
    cl = g.simple("clamp", lu, {"act_min": -50, "act_max": 90})
    r = g.reshape(cl, [None, -1 if False else int(np.prod(g.shapes[cl][1:]))])
    y = g.dense(r, 7, bits=4)
    return g.output(y, softmax=False)
