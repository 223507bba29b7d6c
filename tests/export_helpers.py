"""Small hand-built QuantModels for the export tests (rescales derived as TFLite does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.export.tflite import tfl_add_params, tfl_conv_multiplier, tfl_mul_multiplier, tfl_requant_multiplier
from edgekit.qmodel import OutputSpec, QNode, QuantModel, TensorInfo

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")


def f32(v: float) -> float:
    return float(np.float32(v))


class Builder:
    """Builds a QuantModel op by op; each output scale is a rough guess from its input."""

    def __init__(self, shape=(None, 8, 8, 3), seed: int = 0, in_scale: float = 1.0, in_zp: int = -128):
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list[QNode] = []
        self.constants: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple] = {}
        self.tensors["input"] = TensorInfo("input", list(shape), "float32")
        self.x = self._t("input_q", shape, in_scale, in_zp)
        self.nodes.append(QNode("quantize", "quantize_input", ["input"], [self.x]))
        self.k = 0

    def _t(self, name, shape, scale, zp):
        self.tensors[name] = TensorInfo(name, list(shape), "int8", f32(scale), int(zp))
        self.shapes[name] = tuple(shape)
        return name

    def _name(self, op):
        self.k += 1
        return f"{op}_{self.k}"

    def s(self, t):
        return self.tensors[t].scale

    def conv(self, x, out_ch, k=3, stride=1, pads=None, groups=1, relu=True, bits=8, act=None, dil=1):
        n, h, w, c = self.shapes[x]
        name = self._name("conv")
        ipg = c // groups
        lim = 7 if bits == 4 else 127
        wq = self.rng.integers(-lim - (1 if bits == 4 else 0), lim + 1, size=(out_ch, k, k, ipg)).astype(np.int8)
        w_s = (self.rng.uniform(0.5, 1.5, out_ch) * 0.02).astype(np.float32)
        in_s = self.s(x)
        acc_std = 40 * (lim / 1.7) * np.sqrt(k * k * ipg)
        out_s = f32(in_s * float(w_s.mean()) * acc_std * 3 / 127)
        out_zp = int(self.rng.integers(-20, 20))
        if pads is None:
            p = (k - 1) * dil // 2
            pads = [p, p, (k - 1) * dil - p, (k - 1) * dil - p]
        eff = (k - 1) * dil + 1
        oh = (h + pads[0] + pads[2] - eff) // stride + 1
        ow = (w + pads[1] + pads[3] - eff) // stride + 1
        y = self._t(name + "_out", (n, oh, ow, out_ch), out_s, out_zp)
        mult, shift = zip(*[tfl_conv_multiplier(in_s, float(ws), out_s) for ws in w_s], strict=True)
        bias = (self.rng.integers(-2000, 2000, out_ch)).astype(np.int32)
        for role, arr in (
            ("weight", wq),
            ("bias", bias),
            ("multiplier", np.array(mult, np.int32)),
            ("shift", np.array(shift, np.int32)),
        ):
            self.constants[f"{name}.{role}"] = arr
        lo, hi = (max(-128, out_zp), 127) if relu else (-128, 127)
        if act is not None:
            lo, hi = act
        self.nodes.append(
            QNode(
                "conv2d",
                name,
                [x],
                [y],
                {
                    "strides": [stride, stride],
                    "dilations": [dil, dil],
                    "pads": list(pads),
                    "groups": groups,
                    "weight_bits": bits,
                    "act_min": lo,
                    "act_max": hi,
                },
                {r: f"{name}.{r}" for r in ("weight", "bias", "multiplier", "shift")},
            )
        )
        return y

    def dense(self, x, out_f, relu=False):
        n, k = self.shapes[x]
        name = self._name("dense")
        wq = self.rng.integers(-127, 128, size=(out_f, k)).astype(np.int8)
        w_s = (self.rng.uniform(0.5, 1.5, out_f) * 0.01).astype(np.float32)
        in_s = self.s(x)
        out_s = f32(in_s * float(w_s.mean()) * 40 * 73 * np.sqrt(k) * 3 / 127)
        y = self._t(name + "_out", (n, out_f), out_s, int(self.rng.integers(-10, 10)))
        mult, shift = zip(*[tfl_conv_multiplier(in_s, float(ws), out_s) for ws in w_s], strict=True)
        for role, arr in (
            ("weight", wq),
            ("bias", self.rng.integers(-500, 500, out_f).astype(np.int32)),
            ("multiplier", np.array(mult, np.int32)),
            ("shift", np.array(shift, np.int32)),
        ):
            self.constants[f"{name}.{role}"] = arr
        zp = self.tensors[y].zero_point
        self.nodes.append(
            QNode(
                "dense",
                name,
                [x],
                [y],
                {"weight_bits": 8, "act_min": zp if relu else -128, "act_max": 127},
                {r: f"{name}.{r}" for r in ("weight", "bias", "multiplier", "shift")},
            )
        )
        return y

    def add(self, a, b, relu=True):
        name = self._name("add")
        out_s = f32(max(self.s(a), self.s(b)) * 1.5)
        zp = int(self.rng.integers(-20, 20))
        y = self._t(name + "_out", self.shapes[a], out_s, zp)
        attrs = tfl_add_params(self.s(a), self.s(b), out_s)
        attrs.update(act_min=max(-128, zp) if relu else -128, act_max=127)
        self.nodes.append(QNode("add", name, [a, b], [y], attrs))
        return y

    def mul(self, a, b):
        name = self._name("mul")
        out_s = f32(self.s(a) * self.s(b) * 60)
        y = self._t(name + "_out", self.shapes[a], out_s, 3)
        m, s = tfl_mul_multiplier(self.s(a), self.s(b), out_s)
        self.nodes.append(
            QNode("mul", name, [a, b], [y], {"multiplier": m, "shift": s, "act_min": -128, "act_max": 127})
        )
        return y

    def pool(self, op, x, k=2, stride=2, pads=(0, 0, 0, 0)):
        n, h, w, c = self.shapes[x]
        name = self._name(op)
        oh = (h + pads[0] + pads[2] - k) // stride + 1
        ow = (w + pads[1] + pads[3] - k) // stride + 1
        y = self._t(name + "_out", (n, oh, ow, c), self.s(x), self.tensors[x].zero_point)
        self.nodes.append(
            QNode(op, name, [x], [y], {"kernel": [k, k], "strides": [stride, stride], "pads": list(pads)})
        )
        return y

    def requantize(self, x, factor=0.7, act=(-128, 127)):
        name = self._name("requant")
        out_s = f32(self.s(x) * factor)
        y = self._t(name + "_out", self.shapes[x], out_s, 5)
        m, s = tfl_requant_multiplier(self.s(x), out_s)
        self.nodes.append(
            QNode("requantize", name, [x], [y], {"multiplier": m, "shift": s, "act_min": act[0], "act_max": act[1]})
        )
        return y

    def concat(self, xs, axis=3):
        name = self._name("concat")
        out_s = max(self.s(x) for x in xs)
        zp = self.tensors[xs[0]].zero_point
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[x][axis] for x in xs)
        y = self._t(name + "_out", tuple(shape), out_s, zp)
        ms, ss = [], []
        for x in xs:
            if self.s(x) == out_s and self.tensors[x].zero_point == zp:
                ms.append(None)
                ss.append(None)
            else:
                m, s = tfl_requant_multiplier(self.s(x), out_s)
                ms.append(m)
                ss.append(s)
        self.nodes.append(QNode("concat", name, list(xs), [y], {"axis": axis, "multipliers": ms, "shifts": ss}))
        return y

    def simple(self, op, x, shape, attrs=None, params=None, scale=None, zp=None):
        name = self._name(op)
        y = self._t(
            name + "_out",
            shape,
            self.s(x) if scale is None else scale,
            self.tensors[x].zero_point if zp is None else zp,
        )
        self.nodes.append(QNode(op, name, [x], [y], attrs or {}, params or {}))
        return y

    def lut(self, x, fn=np.tanh, out_s=1 / 128, out_zp=0, name=None):
        """A table built like the quantizer builds it (float32 math, round half away from zero)."""
        from edgekit.quant.arith import round_half_away

        node = self._name("lut")
        q = np.arange(-128, 128)
        real = ((q - self.tensors[x].zero_point).astype(np.float32) * np.float32(self.s(x))).astype(np.float32)
        y = fn(real).astype(np.float32)
        table = np.clip(round_half_away(y / np.float32(out_s)) + out_zp, -128, 127).astype(np.int8)
        self.constants[f"{node}.table"] = table
        return self.simple(
            "lut",
            x,
            self.shapes[x],
            {"function": name or fn.__name__},
            {"table": f"{node}.table"},
            scale=out_s,
            zp=out_zp,
        )

    def build(self, outs, name="test", softmax=False) -> QuantModel:
        outs = [outs] if isinstance(outs, str) else outs
        specs = [OutputSpec(o, ["dequantize", "softmax"] if softmax else ["dequantize"]) for o in outs]
        return QuantModel(name, ["input"], specs, self.tensors, self.nodes, self.constants)


def tiny_resnet(seed: int = 0, bits: int = 8) -> QuantModel:
    """A ResNet-8-shaped toy: conv, residual add, strided conv + 1x1 shortcut, avgpool, dense."""
    b = Builder((None, 16, 16, 3), seed=seed)
    x = b.conv(b.x, 8)
    y = b.conv(x, 8, bits=bits)
    y = b.conv(y, 8, relu=False)
    x = b.add(x, y)
    y = b.conv(x, 16, stride=2)
    y = b.conv(y, 16, relu=False)
    s = b.conv(x, 16, k=1, stride=2, pads=[0, 0, 0, 0], relu=False)
    x = b.add(s, y)
    x = b.pool("avgpool", x, k=8, stride=8)
    x = b.simple("reshape", x, (None, 16), {"shape": [None, 16]})
    x = b.dense(x, 10)
    return b.build(x, "tiny_resnet", softmax=True)


def random_input(qm: QuantModel, n: int, seed: int = 1) -> np.ndarray:
    shape = [n if d is None else d for d in qm.tensors[qm.inputs[0]].shape]
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float32)


_REF: dict = {}


def reference_logits(qm: QuantModel, x: np.ndarray) -> np.ndarray:
    """The reference executor's integer outputs, cached per (model, input) for the test session."""
    key = (qm.content_hash(), x.shape, hash(x.tobytes()))
    if key not in _REF:
        _REF[key] = qm.run(x.astype(np.float32), integer=True)[qm.outputs[0].name]
    return _REF[key]


def every_op_model(with_depthwise: bool = False, seed: int = 5) -> QuantModel:
    """A small graph that uses every exportable op once (conv, pools, add, requantize, concat, pad,
    mul, table, transpose, clamp, reshape, dense); optionally a depthwise conv after the first conv."""
    b = Builder((None, 8, 8, 4), seed=seed)
    c = b.conv(b.x, 8)
    if with_depthwise:
        c = b.conv(c, 8, groups=8, act=(-40, 70))
    m = b.pool("maxpool", c, k=3, stride=2, pads=[0, 0, 1, 1])  # SAME for 8x8
    a = b.pool("avgpool", c, k=3, stride=2, pads=[0, 0, 1, 1])
    s = b.add(m, a, relu=False)
    r = b.requantize(s, 0.6, act=(-100, 100))
    cat = b.concat([s, r, m])
    p = b.simple("pad", cat, (None, 6, 6, 24), {"pads": [[0, 0], [1, 1], [1, 1], [0, 0]]})
    q = b.mul(p, p)
    t = b.lut(q)
    t = b.simple("transpose", t, (None, 24, 6, 6), {"perm": [0, 3, 1, 2]})
    t = b.simple("clamp", t, (None, 24, 6, 6), {"act_min": -30, "act_max": 90})
    f = b.simple("reshape", t, (None, 864), {"shape": [None, 864]})
    return b.build(b.dense(f, 10, relu=True))
