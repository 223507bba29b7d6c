"""HAWQ-V3 dyadic quantization: float IR + calibration statistics -> integer QuantModel.

Activations: int8, per-tensor, asymmetric (zero exactly representable). Weights: per output
channel, symmetric, 8 bits in [-127, 127] or 4 bits in [-8, 7] (clipping chosen per channel
to minimise the squared error). Biases: int32 at scale s_in * s_w. Every rescale is a dyadic
(M, shift) derived from the float32 scales exactly as TFLite derives it, so the same model
written as .tflite computes the same integers. Each conv/dense proves |accumulator| < 2**31.
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError, QuantizationError, UnsupportedOpsError
from edgekit.graph.float_exec import hardswish, infer_shapes, sigmoid
from edgekit.graph.ir import Graph, Node
from edgekit.qmodel import OutputSpec, QNode, QuantModel, TensorInfo
from edgekit.quant import arith
from edgekit.quant.calibrate import TensorStats, activation_range, collect

PASS_THROUGH = {"maxpool", "avgpool", "reshape", "transpose", "pad"}
SIGMOID_SCALE, SIGMOID_ZP = 1.0 / 256, -128  # TFLite's fixed LOGISTIC output quantization


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """int8 asymmetric (scale, zero point) for the float range [lo, hi] (which holds 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if not np.isfinite(scale) or scale <= 0:
        return 1.0, 0
    zp = int(np.clip(arith.round_half_away(-128 - lo / float(scale)), -128, 127))
    return float(scale), zp


def quantize_value(f: float, scale: float, zp: int) -> int:
    """TFLite's quantization of one float (activation clamps, table entries)."""
    return int(zp + arith.round_half_away(np.float32(f) / np.float32(scale)))


def quantize_weights(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric quantization; returns (int8 values, float32 scales)."""
    qmin, qmax = arith.int_range(bits)
    qmin = max(qmin, -qmax) if bits == 8 else qmin  # int8: narrow range, as TFLite wants
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    maxabs = np.abs(flat).max(axis=1)
    if bits >= 8:
        clip = maxabs
    else:  # search the clipping ratio per channel that minimises the squared error
        ratios = np.linspace(0.5, 1.0, 26)
        errs = []
        for r in ratios:
            s = np.maximum(maxabs * r / qmax, 1e-12)[:, None]
            q = np.clip(arith.round_half_away(flat / s), qmin, qmax)
            errs.append(((q * s - flat) ** 2).sum(axis=1))
        clip = maxabs * ratios[np.argmin(np.stack(errs), axis=0)]
    scale = np.maximum(clip / qmax, 1e-12).astype(np.float32)
    q = np.clip(arith.round_half_away(flat / scale[:, None].astype(np.float64)), qmin, qmax)
    return q.astype(np.int8).reshape(w.shape), scale


class _Builder:
    def __init__(
        self,
        graph: Graph,
        stats: dict[str, TensorStats],
        observer: str,
        bits: dict[str, int],
        bias_correction: bool,
        percentile: float,
    ):
        self.g = graph
        self.stats = stats
        self.observer = observer
        self.bits = bits
        self.bias_correction = bias_correction
        self.percentile = percentile
        self.shapes = infer_shapes(graph)
        self.tensors: dict[str, TensorInfo] = {}
        self.nodes: list[QNode] = []
        self.constants: dict[str, np.ndarray] = {}
        self.constant_bits: dict[str, int] = {}
        self.rename: dict[str, str] = {}
        self.ranges: dict[str, tuple[float, float]] = {}

    # ---- tensors ----------------------------------------------------------------------
    def t(self, name: str) -> str:
        return self.rename.get(name, name)

    def shape(self, name: str) -> list[int | None]:
        s = list(self.shapes[name])
        return [None] + s[1:] if s else s

    def define(self, name: str, scale: float, zp: int) -> TensorInfo:
        info = TensorInfo(self.t(name), self.shape(name), "int8", float(scale), int(zp))
        self.tensors[info.name] = info
        return info

    def define_from_stats(self, name: str, observer: str | None = None) -> TensorInfo:
        lo, hi = activation_range(self.stats[name], observer or self.observer, self.percentile)
        self.ranges[self.t(name)] = (lo, hi)
        return self.define(name, *qparams(lo, hi))

    def const_tensor(self, base: str, value: np.ndarray) -> str:
        """A constant operand of add/mul as an int8 tensor with its own quantization."""
        name = f"{base}:int8"
        scale, zp = qparams(float(value.min()), float(value.max()))
        q = np.clip(arith.round_half_away(value / np.float32(scale)) + zp, -128, 127).astype(np.int8)
        self.constants[name] = q
        self.tensors[name] = TensorInfo(name, list(q.shape), "int8", scale, zp)
        return name

    def param(self, node: str, role: str, value: np.ndarray, bits: int = 0) -> str:
        name = f"{node}:{role}"
        self.constants[name] = value
        if bits == 4:
            self.constant_bits[name] = 4
        return name

    def act_range(self, node: Node, out: TensorInfo) -> tuple[int, int]:
        lo, hi = node.attrs.get("activation", (-np.inf, np.inf))
        amin = -128 if not np.isfinite(lo) else max(-128, quantize_value(lo, out.scale, out.zero_point))
        amax = 127 if not np.isfinite(hi) else min(127, quantize_value(hi, out.scale, out.zero_point))
        return amin, amax

    # ---- operators --------------------------------------------------------------------
    def build(self) -> None:
        for name in self.g.inputs:
            qname = f"{name}_int8"
            stats = self.stats[name]
            self.ranges[qname] = (min(stats.min, 0.0), max(stats.max, 0.0))
            info = TensorInfo(qname, self.shape(name), "int8", *qparams(stats.min, stats.max))
            self.tensors[qname] = info
            self.tensors[name] = TensorInfo(name, self.shape(name), "float32")
            self.nodes.append(QNode("quantize", f"{name}:quantize", [name], [qname]))
            self.rename[name] = qname
        unsupported = []
        for node in self.g.nodes:
            fn = getattr(self, "q_" + node.op, None)
            if fn is None:
                unsupported.append((node.op, node.name))
                continue
            fn(node)
        if unsupported:
            raise UnsupportedOpsError(unsupported, context="dyadic quantization")

    def _linear(self, node: Node, op: str) -> None:
        x = self.tensors[self.t(node.inputs[0])]
        out = self.define_from_stats(node.outputs[0])
        bits = self.bits.get(node.name, self.bits.get("*", 8))
        w = node.attrs["weight"]
        b = node.attrs["bias"].astype(np.float64)
        sin = np.float32(x.scale)
        qw, sw = quantize_weights(w, bits)
        floor = (np.abs(b) / (float(sin) * 2**30)).astype(np.float32)  # keeps the int32 bias in range
        if (sw < floor).any():
            sw = np.maximum(sw, floor)
            qmin, qmax = (-127, 127) if bits == 8 else arith.int_range(bits)
            flat = w.reshape(w.shape[0], -1) / sw[:, None].astype(np.float64)
            qw = np.clip(arith.round_half_away(flat), qmin, qmax).astype(np.int8).reshape(w.shape)
        if self.bias_correction:
            b = b - self._bias_shift(node, (qw.astype(np.float64) * sw.reshape((-1,) + (1,) * (w.ndim - 1))) - w)
        bias_scale = (sin * sw).astype(np.float32)
        qb = arith.round_half_away(b / bias_scale.astype(np.float64))
        if np.abs(qb).max(initial=0) >= 2**31:
            raise QuantizationError(f"layer {node.name!r}: bias does not fit int32 at scale s_in*s_w")
        mult, shift = zip(
            *(arith.quantize_multiplier(float(np.float64(sin) * np.float64(s) / np.float64(out.scale))) for s in sw),
            strict=True,
        )
        max_x = max(127 - x.zero_point, x.zero_point + 128)
        bound = int((np.abs(qw.reshape(qw.shape[0], -1).astype(np.int64)).sum(axis=1) * max_x + np.abs(qb)).max())
        if bound >= 2**31:
            raise QuantizationError(
                f"layer {node.name!r}: the int32 accumulator could overflow (|acc| <= {bound} >= 2^31) with "
                f"{bits}-bit weights; lower the weight bit width of this layer or split it"
            )
        amin, amax = self.act_range(node, out)
        attrs: dict[str, Any] = {
            "weight_bits": bits,
            "act_min": amin,
            "act_max": amax,
            "acc_bound": bound,
            "macs": self._macs(node),
            "weight_scale": [float(s) for s in sw],
        }
        if op == "conv2d":
            for k in ("strides", "dilations", "pads", "groups"):
                attrs[k] = node.attrs[k]
        self.nodes.append(
            QNode(
                op,
                node.name,
                [x.name],
                [out.name],
                attrs,
                {
                    "weight": self.param(node.name, "weight", qw, bits),
                    "bias": self.param(node.name, "bias", qb.astype(np.int32)),
                    "multiplier": self.param(node.name, "multiplier", np.array(mult, np.int32)),
                    "shift": self.param(node.name, "shift", np.array(shift, np.int32)),
                },
            )
        )

    def _macs(self, node: Node) -> int:
        out = self.shapes[node.outputs[0]]
        w = node.attrs["weight"]
        return int(np.prod(out[1:-1], dtype=np.int64) * w.size) if w.ndim == 4 else int(np.prod(out[:-1]) * w.size)

    def _bias_shift(self, node: Node, dw: np.ndarray) -> np.ndarray:
        """Expected output shift caused by weight rounding: dW . E[x] per output channel."""
        mean = self.stats[node.inputs[0]].channel_mean
        if mean is None:
            return np.zeros(dw.shape[0])
        if dw.ndim == 2:
            return dw @ mean
        o, _, _, ipg = dw.shape
        opg = o // node.attrs["groups"]
        idx = (np.arange(o)[:, None] // opg) * ipg + np.arange(ipg)[None, :]
        return np.einsum("ohwi,oi->o", dw, mean[idx])

    def q_conv2d(self, node: Node) -> None:
        self._linear(node, "conv2d")

    def q_dense(self, node: Node) -> None:
        self._linear(node, "dense")

    def _operand(self, node: Node, i: int) -> TensorInfo:
        name = node.inputs[i]
        if name in self.g.constants:
            return self.tensors[self.const_tensor(f"{node.name}:operand{i}", self.g.constants[name])]
        return self.tensors[self.t(name)]

    def q_add(self, node: Node) -> None:
        a, b = self._operand(node, 0), self._operand(node, 1)
        out = self.define_from_stats(node.outputs[0])
        left_shift = 20
        twice_max = np.float64(np.float32(2 * max(np.float32(a.scale), np.float32(b.scale))))
        ma, sa = arith.quantize_multiplier(float(np.float64(np.float32(a.scale)) / twice_max))
        mb, sb = arith.quantize_multiplier(float(np.float64(np.float32(b.scale)) / twice_max))
        mo, so = arith.quantize_multiplier(
            float(twice_max / np.float64(np.float32((1 << left_shift) * np.float32(out.scale))))
        )
        amin, amax = self.act_range(node, out)
        self.nodes.append(
            QNode(
                "add",
                node.name,
                [a.name, b.name],
                [out.name],
                {
                    "left_shift": left_shift,
                    "multiplier_a": ma,
                    "shift_a": sa,
                    "multiplier_b": mb,
                    "shift_b": sb,
                    "multiplier": mo,
                    "shift": so,
                    "act_min": amin,
                    "act_max": amax,
                },
            )
        )

    def q_mul(self, node: Node) -> None:
        a, b = self._operand(node, 0), self._operand(node, 1)
        out = self.define_from_stats(node.outputs[0])
        m, s = arith.quantize_multiplier(float(np.float64(a.scale) * np.float64(b.scale) / np.float64(out.scale)))
        amin, amax = self.act_range(node, out)
        self.nodes.append(
            QNode(
                "mul",
                node.name,
                [a.name, b.name],
                [out.name],
                {"multiplier": m, "shift": s, "act_min": amin, "act_max": amax},
            )
        )

    def _same(self, node: Node, op: str, attrs: dict[str, Any]) -> None:
        x = self.tensors[self.t(node.inputs[0])]
        self.ranges[self.t(node.outputs[0])] = self.ranges.get(x.name, (0.0, 0.0))
        out = self.define(node.outputs[0], x.scale, x.zero_point)
        self.nodes.append(QNode(op, node.name, [x.name], [out.name], attrs))

    def q_maxpool(self, node: Node) -> None:
        self._same(node, "maxpool", {k: node.attrs[k] for k in ("kernel", "strides", "pads")})

    def q_avgpool(self, node: Node) -> None:
        self._same(node, "avgpool", {k: node.attrs[k] for k in ("kernel", "strides", "pads")})

    def q_reshape(self, node: Node) -> None:
        self._same(node, "reshape", {"shape": node.attrs["shape"]})

    def q_transpose(self, node: Node) -> None:
        self._same(node, "transpose", {"perm": node.attrs["perm"]})

    def q_pad(self, node: Node) -> None:
        if node.attrs.get("value", 0.0) != 0.0:
            raise UnsupportedOpsError([("Pad (non-zero value)", node.name)], context="dyadic quantization")
        self._same(node, "pad", {"pads": node.attrs["pads"]})

    def _clamp(self, node: Node, lo: float, hi: float) -> None:
        x = self.tensors[self.t(node.inputs[0])]
        fake = Node(node.op, node.name, [], [], {"activation": (lo, hi)})
        amin, amax = self.act_range(fake, x)
        self._same(node, "clamp", {"act_min": amin, "act_max": amax})

    def q_relu(self, node: Node) -> None:
        self._clamp(node, 0.0, np.inf)

    def q_clip(self, node: Node) -> None:
        self._clamp(node, node.attrs["min"], node.attrs["max"])

    def _lut(self, node: Node, fn, out: TensorInfo) -> None:
        x = self.tensors[self.t(node.inputs[0])]
        q = np.arange(-128, 128, dtype=np.int32)
        real = ((q - x.zero_point).astype(np.float32) * np.float32(x.scale)).astype(np.float32)
        y = fn(real).astype(np.float32)
        table = np.clip(arith.round_half_away(y / np.float32(out.scale)) + out.zero_point, -128, 127).astype(np.int8)
        self.nodes.append(
            QNode(
                "lut",
                node.name,
                [x.name],
                [out.name],
                {"function": node.op},
                {"table": self.param(node.name, "table", table)},
            )
        )

    def q_sigmoid(self, node: Node) -> None:
        self._lut(node, sigmoid, self.define(node.outputs[0], SIGMOID_SCALE, SIGMOID_ZP))

    def q_hardswish(self, node: Node) -> None:
        self._lut(node, hardswish, self.define_from_stats(node.outputs[0]))

    def q_concat(self, node: Node) -> None:
        ins = [self._operand(node, i) for i in range(len(node.inputs))]
        out = self.define_from_stats(node.outputs[0])
        mults, shifts = [], []
        for x in ins:
            if x.scale == out.scale and x.zero_point == out.zero_point:
                mults.append(None)
                shifts.append(None)
            else:
                m, s = arith.quantize_multiplier(float(np.float64(x.scale) / np.float64(out.scale)))
                mults.append(m)
                shifts.append(s)
        self.nodes.append(
            QNode(
                "concat",
                node.name,
                [x.name for x in ins],
                [out.name],
                {"axis": node.attrs["axis"], "multipliers": mults, "shifts": shifts},
            )
        )

    def q_softmax(self, node: Node) -> None:
        if node.outputs[0] not in self.g.outputs:
            raise UnsupportedOpsError([("Softmax (not at a graph output)", node.name)], context="dyadic quantization")
        src = self.t(node.inputs[0])
        self.softmax_outputs = getattr(self, "softmax_outputs", {})
        self.softmax_outputs[node.outputs[0]] = (src, node.attrs["axis"])


def _rename_tensor(qm_nodes: list[QNode], tensors: dict[str, TensorInfo], old: str, new: str) -> None:
    for n in qm_nodes:
        n.inputs = [new if i == old else i for i in n.inputs]
        n.outputs = [new if o == old else o for o in n.outputs]
    info = tensors.pop(old)
    info.name = new
    tensors[new] = info


def quantize_graph(
    graph: Graph,
    calib,
    *,
    weight_bits: int | dict[str, int] = 8,
    observer: str = "mse",
    bias_correction: bool | None = None,
    percentile: float = 99.99,
    progress: bool = True,
    max_calib_samples: int | None = None,
    stats: dict[str, TensorStats] | None = None,
) -> QuantModel:
    """Quantize a float IR graph; ``weight_bits`` is 8, 4, or {layer name: bits} ("*" = default)."""
    bits = {"*": weight_bits} if isinstance(weight_bits, int) else dict(weight_bits)
    for layer, b in bits.items():
        if b not in (4, 8):
            raise QuantizationError(f"weight bits must be 4 or 8, got {b} for {layer!r}")
    if bias_correction is None:
        bias_correction = any(b == 4 for b in bits.values())
    if stats is None:
        stats = collect(graph, calib, observer=observer, progress=progress, max_samples=max_calib_samples)
    b = _Builder(graph, stats, observer, bits, bias_correction, percentile)
    b.build()
    outputs = []
    softmax = getattr(b, "softmax_outputs", {})
    for name in graph.outputs:
        if name in softmax:
            src, axis = softmax[name]
            _rename_tensor(b.nodes, b.tensors, src, name)
            outputs.append(OutputSpec(name, ["dequantize", "softmax"], axis))
        else:
            src = b.t(name)
            if src != name:
                _rename_tensor(b.nodes, b.tensors, src, name)
            outputs.append(OutputSpec(name, ["dequantize"]))
    calibration = {
        t: {"min": s.min, "max": s.max, "range": list(b.ranges.get(b.t(t), (s.min, s.max)))}
        for t, s in stats.items()
        if b.t(t) in b.tensors
    }
    from edgekit import __version__

    provenance = {
        "edgekit_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "scheme": "dyadic",
        "source": graph.source,
        "options": {
            "weight_bits": bits,
            "observer": observer,
            "bias_correction": bias_correction,
            "percentile": percentile,
        },
        "calibration_samples": max((st.samples for st in stats.values()), default=0),
        "host": platform.platform(),
    }
    return QuantModel(
        name=graph.name,
        inputs=list(graph.inputs),
        outputs=outputs,
        tensors=b.tensors,
        nodes=b.nodes,
        constants=b.constants,
        calibration=calibration,
        provenance=provenance,
        constant_bits=b.constant_bits,
    )


def quantize_model(model: str | Path | Graph, calib, **options) -> QuantModel:
    """Import (if given a path) and quantize a float model with the dyadic scheme."""
    if isinstance(model, Graph):
        graph = model
    else:
        path = Path(model)
        if path.suffix.lower() != ".onnx":
            raise EdgekitError(f"{path}: edgekit imports ONNX models (.onnx) for the dyadic scheme")
        from edgekit.graph.onnx_import import import_onnx

        graph = import_onnx(path)
    return quantize_graph(graph, calib, **options)
