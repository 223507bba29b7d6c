"""Export a QuantModel to a TFLite flatbuffer (int8, NHWC), written directly, no TensorFlow.

Every integer rescale of the QuantModel is a dyadic (M, shift) that TFLite derives from
float32 scales at Prepare time (``edgekit.quant.arith``). The writer therefore chooses the
float32 scales (activation scales from the model's tensors, weight scales solved per output
channel) and *checks*, op by op, that TFLite's own derivation gives back exactly the model's
(M, shift): an export that could not be bit-exact fails instead of drifting silently.

Mapping (QuantModel op -> TFLite builtins):

- ``quantize`` at an input: the int8 input tensor itself (default) or a float32 input + QUANTIZE.
- ``conv2d`` -> CONV_2D / DEPTHWISE_CONV_2D (explicit pads -> SAME/VALID, else PAD + VALID);
  ``dense`` -> FULLY_CONNECTED (per-channel); ``add`` -> ADD; ``mul`` -> MUL;
  ``avgpool``/``maxpool`` -> AVERAGE_POOL_2D / MAX_POOL_2D; ``requantize`` -> QUANTIZE
  (int8 -> int8); ``concat`` -> QUANTIZE per rescaled input + CONCATENATION (TFLite's own
  rescaling concat rounds in float); ``pad`` -> PAD; ``reshape`` -> RESHAPE; ``transpose``
  -> TRANSPOSE; ``clamp`` and clamps no fused activation can express -> MAXIMUM/MINIMUM;
  ``lut`` -> CAST + ADD + GATHER over the 256-entry table (exact by construction).
- Outputs stay int8 (the integer logits); the float epilogue (dequantize, softmax) is recorded
  in the metadata, or appended as DEQUANTIZE (+ SOFTMAX) outputs with ``float_outputs=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np

from edgekit.errors import EdgekitError, UnsupportedOpsError
from edgekit.qmodel import QNode, QuantModel
from edgekit.quant.arith import quantize_multiplier

CONTEXT = "TFLite export"
SUPPORTED = {
    "quantize",
    "conv2d",
    "dense",
    "add",
    "mul",
    "avgpool",
    "maxpool",
    "requantize",
    "concat",
    "pad",
    "reshape",
    "transpose",
    "clamp",
    "lut",
}

# TensorType values of the schema
T_FLOAT32, T_INT32, T_UINT8, T_INT64, T_INT8 = 0, 2, 3, 4, 9
_NP_TYPE = {
    np.dtype(np.float32): T_FLOAT32,
    np.dtype(np.int32): T_INT32,
    np.dtype(np.uint8): T_UINT8,
    np.dtype(np.int64): T_INT64,
    np.dtype(np.int8): T_INT8,
}


class ExportError(EdgekitError):
    """The model cannot be written bit-exactly in the requested format."""


def _version() -> str:
    import edgekit

    return edgekit.__version__


# ---------------------------------------------------------------------------------------
# TFLite's Prepare-time derivations (what the interpreter will compute from our scales)
# ---------------------------------------------------------------------------------------


def tfl_conv_multiplier(in_s: float, w_s: float, out_s: float) -> tuple[int, int]:
    """Per-channel CONV_2D/DEPTHWISE/FULLY_CONNECTED (PopulateConvolutionQuantizationParams):
    double(in) * double(w) / double(out), each a float32 scale."""
    return quantize_multiplier(float(np.float32(in_s)) * float(np.float32(w_s)) / float(np.float32(out_s)))


def tfl_add_params(sa: float, sb: float, so: float, left_shift: int = 20) -> dict[str, int]:
    """TFLite ADD (int8) Prepare: the rescales of both inputs and of the sum."""
    sa, sb, so = (float(np.float32(v)) for v in (sa, sb, so))
    twice_max = 2.0 * max(sa, sb)
    m1, s1 = quantize_multiplier(sa / twice_max)
    m2, s2 = quantize_multiplier(sb / twice_max)
    mo, sh = quantize_multiplier(twice_max / ((1 << left_shift) * so))
    return {
        "left_shift": left_shift,
        "multiplier_a": m1,
        "shift_a": s1,
        "multiplier_b": m2,
        "shift_b": s2,
        "multiplier": mo,
        "shift": sh,
    }


def tfl_mul_multiplier(sa: float, sb: float, so: float) -> tuple[int, int]:
    """TFLite MUL (int8) Prepare: double(sa) * double(sb) / double(so)."""
    return quantize_multiplier(float(np.float32(sa)) * float(np.float32(sb)) / float(np.float32(so)))


def tfl_requant_multiplier(si: float, so: float) -> tuple[int, int]:
    """TFLite QUANTIZE int8 -> int8 Prepare: double(si) / double(so)."""
    return quantize_multiplier(float(np.float32(si)) / float(np.float32(so)))


def solve_weight_scale(m: int, shift: int, in_s: float, out_s: float, hint: float | None = None) -> np.float32:
    """A float32 weight scale from which TFLite derives exactly (m, shift), or raise.

    ``hint`` (the quantizer's own weight scale) is used when it derives (m, shift); else the
    float32 neighbourhood of m * 2**(shift - 31) * out / in is searched.
    """
    if m == 0:
        return np.float32(0.0)
    if hint is not None and tfl_conv_multiplier(in_s, hint, out_s) == (m, shift):
        return np.float32(hint)
    real = m * 2.0 ** (shift - 31)
    guess = np.float32(real * float(np.float32(out_s)) / float(np.float32(in_s)))
    up = down = guess
    for _ in range(256):
        for cand in (up, down):
            if tfl_conv_multiplier(in_s, float(cand), out_s) == (m, shift):
                return cand
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(0))
    raise ExportError(
        f"{CONTEXT}: no float32 weight scale makes TFLite derive the multiplier ({m}, {shift}) "
        f"for input scale {in_s} and output scale {out_s}; the model's rescale was not derived from "
        "float32 scales, so a .tflite file cannot reproduce it bit-exactly"
    )


# ---------------------------------------------------------------------------------------
# The flatbuffer model being assembled
# ---------------------------------------------------------------------------------------


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    signature: list[int] | None
    ttype: int
    buffer: int = 0
    scale: list[float] | None = None
    zero_point: list[int] | None = None
    qdim: int = 0


@dataclass
class _Op:
    code: int
    version: int
    inputs: list[int]
    outputs: list[int]
    options_type: int = 0
    options: tuple[str, dict[str, Any]] | None = None


@dataclass
class _Graph:
    tensors: list[_Tensor] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=lambda: [b""])
    ops: list[_Op] = field(default_factory=list)

    def add(
        self,
        name: str,
        shape: list[int],
        dtype: Any,
        *,
        data: np.ndarray | None = None,
        scale: Any = None,
        zero_point: Any = None,
        qdim: int = 0,
        signature: list[int] | None = None,
    ) -> int:
        base, k = name, 1
        while name in self.index:
            name = f"{base}_{k}"
            k += 1
        buf = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buf = len(self.buffers) - 1
        sc = None if scale is None else [float(v) for v in np.atleast_1d(np.asarray(scale, dtype=np.float32))]
        zp = None if zero_point is None else [int(v) for v in np.atleast_1d(zero_point)]
        self.tensors.append(
            _Tensor(name, [int(d) for d in shape], signature, _NP_TYPE[np.dtype(dtype)], buf, sc, zp, qdim)
        )
        self.index[name] = len(self.tensors) - 1
        return self.index[name]

    def const(self, name: str, arr: np.ndarray, **q: Any) -> int:
        return self.add(name, list(arr.shape), arr.dtype, data=arr, **q)


def _vec_i32(b: flatbuffers.Builder, vals: list[int]) -> int:
    return b.CreateNumpyVector(np.asarray(vals, dtype=np.int32))


class _vec_i32_deferred(list):  # noqa: N801
    """Marker: an int32 vector field created while its (options) table is built."""


def _table(b: flatbuffers.Builder, mod_name: str, fields: dict[str, Any]) -> int:
    """Build a schema table by module name (``Conv2DOptions``) with scalar/offset fields."""
    import importlib

    fields = {k: (_vec_i32(b, list(v)) if isinstance(v, _vec_i32_deferred) else v) for k, v in fields.items()}
    mod = importlib.import_module(f"tflite.{mod_name}")
    getattr(mod, f"{mod_name}Start")(b)
    for k, v in fields.items():
        getattr(mod, f"{mod_name}Add{k}")(b, v)
    return getattr(mod, f"{mod_name}End")(b)


def _serialize(
    g: _Graph,
    inputs: list[int],
    outputs: list[int],
    metadata: dict[str, bytes],
    description: str,
    sig_names: tuple[list[str], list[str]] | None = None,
) -> bytes:
    from tflite.BuiltinOptions import BuiltinOptions

    b = flatbuffers.Builder(1024)
    # buffers (metadata buffers appended after the graph's)
    all_buffers = list(g.buffers)
    meta_idx = {}
    for k, v in metadata.items():
        all_buffers.append(v)
        meta_idx[k] = len(all_buffers) - 1
    buf_offs = []
    for data in all_buffers:
        if data:
            b.StartVector(1, len(data), 16)
            b.head = b.head - len(data)
            b.Bytes[b.head : b.head + len(data)] = data
            vec = b.EndVector()
            buf_offs.append(_table(b, "Buffer", {"Data": vec}))
        else:
            buf_offs.append(_table(b, "Buffer", {}))
    # tensors
    t_offs = []
    for t in g.tensors:
        name = b.CreateString(t.name)
        shape = _vec_i32(b, t.shape)
        sig = _vec_i32(b, t.signature) if t.signature is not None else None
        q = None
        if t.scale is not None:
            sc = b.CreateNumpyVector(np.asarray(t.scale, dtype=np.float32))
            zp = b.CreateNumpyVector(np.asarray(t.zero_point, dtype=np.int64))
            q = _table(b, "QuantizationParameters", {"Scale": sc, "ZeroPoint": zp, "QuantizedDimension": t.qdim})
        fields: dict[str, Any] = {"Shape": shape, "Type": t.ttype, "Buffer": t.buffer, "Name": name}
        if q is not None:
            fields["Quantization"] = q
        if sig is not None:
            fields["ShapeSignature"] = sig
        t_offs.append(_table(b, "Tensor", fields))
    # operator codes
    codes: dict[tuple[int, int], int] = {}
    for op in g.ops:
        codes.setdefault((op.code, op.version), len(codes))
    code_offs = [
        _table(b, "OperatorCode", {"DeprecatedBuiltinCode": min(c, 127), "BuiltinCode": c, "Version": v})
        for (c, v) in codes
    ]
    op_offs = []
    for op in g.ops:
        ins, outs = _vec_i32(b, op.inputs), _vec_i32(b, op.outputs)
        fields = {"OpcodeIndex": codes[(op.code, op.version)], "Inputs": ins, "Outputs": outs}
        if op.options is not None:
            mod_name, vals = op.options
            fields["BuiltinOptionsType"] = getattr(BuiltinOptions, mod_name)
            fields["BuiltinOptions"] = _table(b, mod_name, vals)
        op_offs.append(_table(b, "Operator", fields))

    def vec_of(offs: list[int]) -> int:
        b.StartVector(4, len(offs), 4)
        for o in reversed(offs):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    sg_name = b.CreateString("main")
    sg = _table(
        b,
        "SubGraph",
        {
            "Tensors": vec_of(t_offs),
            "Inputs": _vec_i32(b, inputs),
            "Outputs": _vec_i32(b, outputs),
            "Operators": vec_of(op_offs),
            "Name": sg_name,
        },
    )

    # signature: names as the QuantModel has them
    def tmaps(idx: list[int], names: list[str] | None) -> int:
        offs = []
        for k, i in enumerate(idx):
            nm = b.CreateString(names[k] if names else g.tensors[i].name)
            offs.append(_table(b, "TensorMap", {"Name": nm, "TensorIndex": i}))
        return vec_of(offs)

    sig_in = tmaps(inputs, sig_names[0] if sig_names else None)
    sig_out = tmaps(outputs, sig_names[1] if sig_names else None)
    key = b.CreateString("serving_default")
    sig = _table(b, "SignatureDef", {"Inputs": sig_in, "Outputs": sig_out, "SignatureKey": key, "SubgraphIndex": 0})
    meta_offs = []
    for k, i in meta_idx.items():
        nm = b.CreateString(k)
        meta_offs.append(_table(b, "Metadata", {"Name": nm, "Buffer": i}))
    desc = b.CreateString(description)
    model = _table(
        b,
        "Model",
        {
            "Version": 3,
            "OperatorCodes": vec_of(code_offs),
            "Subgraphs": vec_of([sg]),
            "Description": desc,
            "Buffers": vec_of(buf_offs),
            "Metadata": vec_of(meta_offs),
            "SignatureDefs": vec_of([sig]),
        },
    )
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())


# ---------------------------------------------------------------------------------------
# QuantModel -> graph
# ---------------------------------------------------------------------------------------

# BuiltinOperator codes and the op versions LiteRT's resolver registers for int8
ADD, AVERAGE_POOL_2D, CONCATENATION, CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE = 0, 1, 2, 3, 4, 6
FULLY_CONNECTED, LOGISTIC, MAX_POOL_2D, MUL, RESHAPE, SOFTMAX = 9, 14, 17, 18, 22, 25
PAD, GATHER, TRANSPOSE, CAST, MAXIMUM, MINIMUM, PADV2, QUANTIZE, HARD_SWISH = 34, 36, 39, 53, 55, 57, 60, 114, 117
VERSIONS = {
    ADD: 2,
    AVERAGE_POOL_2D: 2,
    CONCATENATION: 2,
    CONV_2D: 3,
    DEPTHWISE_CONV_2D: 3,
    DEQUANTIZE: 2,
    FULLY_CONNECTED: 4,
    MAX_POOL_2D: 2,
    MUL: 2,
    RESHAPE: 1,
    SOFTMAX: 2,
    PAD: 2,
    GATHER: 2,
    TRANSPOSE: 2,
    CAST: 1,
    MAXIMUM: 2,
    MINIMUM: 2,
    QUANTIZE: 2,
    LOGISTIC: 2,
    HARD_SWISH: 1,
    PADV2: 2,
}
NATIVE_LUTS = {"sigmoid": LOGISTIC, "hardswish": HARD_SWISH, "hard_swish": HARD_SWISH}
_PROBES: dict[tuple, bool] = {}


def native_lut_is_exact(code: int, in_q: tuple[float, int], out_q: tuple[float, int], table: np.ndarray) -> bool:
    """Whether LiteRT's builtin ``code`` kernel (LOGISTIC, HARD_SWISH) reproduces ``table`` on all
    256 int8 inputs with these quantization parameters: measured, not assumed."""
    key = (code, in_q, out_q, table.tobytes())
    if key not in _PROBES:
        g = _Graph()
        i = g.add("x", [1, 256], np.int8, scale=np.float32(in_q[0]), zero_point=in_q[1])
        o = g.add("y", [1, 256], np.int8, scale=np.float32(out_q[0]), zero_point=out_q[1])
        g.ops.append(_Op(code, VERSIONS[code], [i], [o]))
        data = _serialize(g, [i], [o], {}, "edgekit lut probe")
        try:
            got = run_tflite(data, np.arange(-128, 128, dtype=np.int8).reshape(1, 256))
            _PROBES[key] = bool(np.array_equal(got.reshape(256), table.reshape(256)))
        except Exception:  # noqa: BLE001 - a kernel that refuses these qparams is simply not used
            _PROBES[key] = False
    return _PROBES[key]


ACT_NONE, ACT_RELU, ACT_RELU6 = 0, 1, 3
PAD_SAME, PAD_VALID = 0, 1


def _same_pads(in_hw: tuple[int, int], kernel: tuple[int, int], strides, dilations) -> list[int]:
    """The [top, left, bottom, right] TFLite's SAME padding uses for this input size."""
    out = []
    for i in range(2):
        eff = (kernel[i] - 1) * dilations[i] + 1
        o = -(-in_hw[i] // strides[i])
        total = max((o - 1) * strides[i] + eff - in_hw[i], 0)
        out.append((total // 2, total - total // 2))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]


def _weight_scales(node: QNode, mult: np.ndarray, shift: np.ndarray, in_s: float, out_s: float) -> np.ndarray:
    hints = node.attrs.get("weight_scale")
    hints = [None] * len(mult) if hints is None else list(np.broadcast_to(np.asarray(hints, np.float64), (len(mult),)))
    return np.array(
        [solve_weight_scale(int(m), int(s), in_s, out_s, h) for m, s, h in zip(mult, shift, hints, strict=True)],
        dtype=np.float32,
    )


class _Exporter:
    def __init__(
        self, qm: QuantModel, *, batch: int | None, float_input: bool, float_outputs: bool, native_luts: bool = True
    ):
        self.qm = qm
        self.native_luts = native_luts
        self.batch = batch
        self.float_input = float_input
        self.float_outputs = float_outputs
        self.g = _Graph()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dynamic_batch = batch is None

    # -- tensors --------------------------------------------------------------------
    def _shape(self, name: str, shape: tuple[int, ...]) -> tuple[list[int], list[int] | None]:
        info = self.qm.tensors.get(name)
        dyn = self.dynamic_batch and info is not None and info.shape and info.shape[0] is None
        static = [int(d) for d in shape]
        return static, ([-1] + static[1:] if dyn else None)

    def act(self, name: str, shape: tuple[int, ...]) -> int:
        """The int8 activation tensor ``name`` (created on first use)."""
        if name in self.g.index:
            return self.g.index[name]
        info = self.qm.tensors[name]
        static, sig = self._shape(name, shape)
        self.shapes[name] = tuple(static)
        return self.g.add(
            name, static, np.int8, scale=np.float32(info.scale), zero_point=int(info.zero_point), signature=sig
        )

    def tmp(self, base: str, shape: tuple[int, ...], scale: float, zp: int, dtype: Any = np.int8) -> int:
        static, sig = self._shape(base.split(":")[0], shape)
        q = {} if scale is None else {"scale": np.float32(scale), "zero_point": zp}
        return self.g.add(base, static, dtype, signature=sig, **q)

    def op(self, code: int, ins: list[int], outs: list[int], options: tuple[str, dict] | None = None) -> None:
        self.g.ops.append(_Op(code, VERSIONS.get(code, 1), ins, outs, options=options))

    def scale(self, name: str) -> float:
        return float(np.float32(self.qm.tensors[name].scale))

    def zp(self, name: str) -> int:
        return int(self.qm.tensors[name].zero_point)

    # -- helpers --------------------------------------------------------------------
    def fused_act(self, node: QNode, out: str) -> tuple[int, tuple[int, int] | None]:
        """A fused activation TFLite derives as (act_min, act_max), else NONE + explicit clamp."""
        lo, hi = int(node.attrs.get("act_min", -128)), int(node.attrs.get("act_max", 127))
        z, s = self.zp(out), self.scale(out)
        if (lo, hi) == (-128, 127):
            return ACT_NONE, None
        if lo == max(-128, z) and hi == 127:
            return ACT_RELU, None
        if lo == max(-128, z) and hi == min(127, z + int(np.round(np.float32(6.0) / np.float32(s)))):
            return ACT_RELU6, None
        return ACT_NONE, (lo, hi)

    def clamp(self, t_in: int, out_name: str, lo: int, hi: int, shape: tuple[int, ...]) -> None:
        """Clamp raw int8 values with MAXIMUM/MINIMUM against int8 scalar constants (exact)."""
        s, z = self.scale(out_name), self.zp(out_name)
        cur = t_in
        steps = [(MAXIMUM, lo)] if lo > -128 else []
        if hi < 127:
            steps.append((MINIMUM, hi))
        if not steps:
            steps = [(MAXIMUM, -128)]
        for i, (code, v) in enumerate(steps):
            c = self.g.const(f"{out_name}/clamp_{v}", np.array([v], np.int8), scale=s, zero_point=z)
            dst = self.act(out_name, shape) if i == len(steps) - 1 else self.tmp(f"{out_name}/pre_min", shape, s, z)
            self.op(code, [cur, c], [dst])
            cur = dst

    def out_or_pre(self, node: QNode, shape: tuple[int, ...]) -> tuple[int, int, tuple[int, int] | None]:
        out = node.outputs[0]
        act, extra = self.fused_act(node, out)
        if extra is None:
            return self.act(out, shape), act, None
        return self.tmp(f"{out}/unclamped", shape, self.scale(out), self.zp(out)), act, extra

    def finish_clamp(self, node: QNode, pre: int, extra: tuple[int, int] | None, shape) -> None:
        if extra is not None:
            self.clamp(pre, node.outputs[0], extra[0], extra[1], shape)

    def check(self, node: QNode, what: str, got: tuple, want: tuple) -> None:
        if tuple(int(v) for v in got) != tuple(int(v) for v in want):
            raise ExportError(
                f"{CONTEXT}: node {node.name!r} ({node.op}): TFLite would derive {what} = {tuple(got)} from the "
                f"tensor scales, but the model uses {tuple(want)}; its rescale was not derived as TFLite does, "
                "so the .tflite file would not be bit-exact"
            )

    # -- ops ------------------------------------------------------------------------
    def run(self) -> tuple[bytes, dict[str, Any]]:
        qm = self.qm
        bad = [(n.op, n.name) for n in qm.nodes if n.op not in SUPPORTED]
        if bad:
            raise UnsupportedOpsError(bad, context=CONTEXT)
        shapes = self._infer_shapes()
        sub_inputs: list[int] = []
        for name in qm.inputs:
            producer = next((n for n in qm.nodes if n.op == "quantize" and n.inputs[0] == name), None)
            if producer is None:
                raise ExportError(f"{CONTEXT}: input {name!r} is not followed by a quantize node")
            q_out = producer.outputs[0]
            if self.float_input:
                static, sig = self._shape(q_out, shapes[q_out])
                fi = self.g.add(name, static, np.float32, signature=sig)
                self.op(QUANTIZE, [fi], [self.act(q_out, shapes[q_out])])
                sub_inputs.append(fi)
            else:
                sub_inputs.append(self.act(q_out, shapes[q_out]))
        for node in qm.nodes:
            if node.op == "quantize":
                continue
            getattr(self, f"op_{node.op}")(node, shapes)
        sub_outputs = []
        for o in qm.outputs:
            t = self.g.index[o.name]
            if self.float_outputs:
                shp = shapes[o.name]
                f = self.tmp(f"{o.name}/dequantized", shp, None, 0, np.float32)
                self.op(DEQUANTIZE, [t], [f])
                if "softmax" in o.epilogue:
                    sm = self.tmp(f"{o.name}/softmax", shp, None, 0, np.float32)
                    self.op(SOFTMAX, [f], [sm], ("SoftmaxOptions", {"Beta": 1.0}))
                    f = sm
                t = f
            sub_outputs.append(t)
        meta = self._metadata(shapes)
        data = _serialize(
            self.g,
            sub_inputs,
            sub_outputs,
            {"edgekit": json.dumps(meta, sort_keys=True).encode(), "min_runtime_version": b"2.3.0"},
            f"edgekit {_version()}: {qm.name}",
            sig_names=(list(qm.inputs), [o.name for o in qm.outputs]),
        )
        return data, meta

    def _metadata(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        qm = self.qm
        bits = {n.name: int(n.attrs.get("weight_bits", 8)) for n in qm.nodes if "weight" in n.params}
        return {
            "producer": "edgekit",
            "edgekit_version": _version(),
            "model": qm.name,
            "content_hash": qm.content_hash(),
            "inputs": [
                {
                    "signature_name": n,
                    "tensor": (
                        n
                        if self.float_input
                        else self.g.tensors[
                            self.g.index[
                                next(x for x in qm.nodes if x.op == "quantize" and x.inputs[0] == n).outputs[0]
                            ]
                        ].name
                    ),
                    "dtype": "float32" if self.float_input else "int8",
                }
                for n in qm.inputs
            ],
            "outputs": [
                {"name": o.name, "epilogue": o.epilogue, "in_graph": bool(self.float_outputs)} for o in qm.outputs
            ],
            "weight_bits": bits,
        }

    def _infer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shapes (batch 1 unless ``batch``) from the reference executor on zeros."""
        from edgekit.reference import execute_all

        b = self.batch or 1
        feeds = {}
        for name in self.qm.inputs:
            info = self.qm.tensors[name]
            shp = [b if d is None else int(d) for d in info.shape]
            feeds[name] = np.zeros(shp, dtype=np.float32)
        env = execute_all(self.qm, feeds)
        return {k: tuple(np.shape(v)) for k, v in env.items()}

    def op_conv2d(self, node: QNode, shapes) -> None:
        qm, a = self.qm, node.attrs
        x, out = node.inputs[0], node.outputs[0]
        w = np.asarray(qm.constants[node.params["weight"]]).astype(np.int8)
        bias = np.asarray(qm.constants[node.params["bias"]]).astype(np.int32)
        mult = np.asarray(qm.constants[node.params["multiplier"]]).reshape(-1)
        shift = np.asarray(qm.constants[node.params["shift"]]).reshape(-1)
        o, kh, kw, ipg = w.shape
        mult = np.broadcast_to(mult, (o,))
        shift = np.broadcast_to(shift, (o,))
        in_s, out_s = self.scale(x), self.scale(out)
        w_s = _weight_scales(node, mult, shift, in_s, out_s)
        b_s = (w_s * np.float32(in_s)).astype(np.float32)
        t_in = self.act(x, shapes[x])
        in_shape = shapes[x]
        c = in_shape[3]
        groups = int(a.get("groups", 1))
        strides, dil = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        padding = self._padding(node, t_in, x, in_shape, (kh, kw), strides, dil, pads)
        if isinstance(padding, tuple):
            t_in, padding = padding
        t_out, act, extra = self.out_or_pre(node, shapes[out])
        if groups == 1:
            wt = self.g.const(node.params["weight"], w, scale=w_s, zero_point=np.zeros(o, np.int64), qdim=0)
            code, opts = (
                CONV_2D,
                (
                    "Conv2DOptions",
                    {
                        "Padding": padding,
                        "StrideW": strides[1],
                        "StrideH": strides[0],
                        "FusedActivationFunction": act,
                        "DilationWFactor": dil[1],
                        "DilationHFactor": dil[0],
                    },
                ),
            )
        elif ipg == 1 and groups == c:
            wd = np.ascontiguousarray(w.transpose(3, 1, 2, 0))  # [1, KH, KW, O]
            wt = self.g.const(node.params["weight"], wd, scale=w_s, zero_point=np.zeros(o, np.int64), qdim=3)
            code, opts = (
                DEPTHWISE_CONV_2D,
                (
                    "DepthwiseConv2DOptions",
                    {
                        "Padding": padding,
                        "StrideW": strides[1],
                        "StrideH": strides[0],
                        "DepthMultiplier": o // c,
                        "FusedActivationFunction": act,
                        "DilationWFactor": dil[1],
                        "DilationHFactor": dil[0],
                    },
                ),
            )
        else:
            raise UnsupportedOpsError([(f"conv2d(groups={groups})", node.name)], context=CONTEXT)
        bt = self.g.const(node.params["bias"], bias, scale=b_s, zero_point=np.zeros(o, np.int64), qdim=0)
        self.op(code, [t_in, wt, bt], [t_out], opts)
        self.finish_clamp(node, t_out, extra, shapes[out])

    def _padding(self, node: QNode, t_in: int, x: str, in_shape, kernel, strides, dil, pads, fill=None):
        """SAME/VALID if the pads match, else an explicit PAD + VALID.

        ``fill=None`` pads with the zero point (convolutions); ``fill=-128`` pads with the int8
        minimum through PADV2 (max pooling, where padded cells must never win).
        """
        if not any(pads):
            return PAD_VALID
        if pads == _same_pads(in_shape[1:3], kernel, strides, dil):
            return PAD_SAME
        if node.op == "avgpool":
            raise UnsupportedOpsError(
                [(f"avgpool(pads={pads}, not SAME: TFLite cannot exclude them)", node.name)], context=CONTEXT
            )
        top, left, bottom, right = pads
        shp = (in_shape[0], in_shape[1] + top + bottom, in_shape[2] + left + right, in_shape[3])
        pt = self.g.const(f"{node.name}/paddings", np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32))
        padded = self.tmp(f"{node.name}/padded", shp, self.scale(x), self.zp(x))
        if fill is None:
            self.op(PAD, [t_in, pt], [padded])
        else:
            cv = self.g.const(
                f"{node.name}/pad_value", np.array([fill], np.int8), scale=self.scale(x), zero_point=self.zp(x)
            )
            self.op(PADV2, [t_in, pt, cv], [padded])
        return padded, PAD_VALID

    def op_dense(self, node: QNode, shapes) -> None:
        qm = self.qm
        x, out = node.inputs[0], node.outputs[0]
        w = np.asarray(qm.constants[node.params["weight"]]).astype(np.int8)
        o = w.shape[0]
        bias = np.asarray(qm.constants[node.params["bias"]]).astype(np.int32)
        mult = np.broadcast_to(np.asarray(qm.constants[node.params["multiplier"]]).reshape(-1), (o,))
        shift = np.broadcast_to(np.asarray(qm.constants[node.params["shift"]]).reshape(-1), (o,))
        in_s, out_s = self.scale(x), self.scale(out)
        w_s = _weight_scales(node, mult, shift, in_s, out_s)
        b_s = (w_s * np.float32(in_s)).astype(np.float32)
        if len(shapes[x]) != 2:
            raise UnsupportedOpsError([(f"dense(rank {len(shapes[x])} input)", node.name)], context=CONTEXT)
        t_in = self.act(x, shapes[x])
        t_out, act, extra = self.out_or_pre(node, shapes[out])
        wt = self.g.const(node.params["weight"], w, scale=w_s, zero_point=np.zeros(o, np.int64), qdim=0)
        bt = self.g.const(node.params["bias"], bias, scale=b_s, zero_point=np.zeros(o, np.int64), qdim=0)
        self.op(
            FULLY_CONNECTED,
            [t_in, wt, bt],
            [t_out],
            ("FullyConnectedOptions", {"FusedActivationFunction": act, "KeepNumDims": False}),
        )
        self.finish_clamp(node, t_out, extra, shapes[out])

    def op_add(self, node: QNode, shapes) -> None:
        a, b_ = node.inputs
        out = node.outputs[0]
        want = tfl_add_params(self.scale(a), self.scale(b_), self.scale(out), int(node.attrs.get("left_shift", 20)))
        for k, v in want.items():
            self.check(node, k, (v,), (node.attrs[k],))
        ta, tb = self._operand(a, shapes), self._operand(b_, shapes)
        t_out, act, extra = self.out_or_pre(node, shapes[out])
        self.op(ADD, [ta, tb], [t_out], ("AddOptions", {"FusedActivationFunction": act}))
        self.finish_clamp(node, t_out, extra, shapes[out])

    def _operand(self, name: str, shapes) -> int:
        if name in self.qm.constants and name not in self.g.index:
            arr = np.asarray(self.qm.constants[name]).astype(np.int8)
            return self.g.const(
                name,
                arr,
                scale=np.float32(self.qm.tensors[name].scale),
                zero_point=int(self.qm.tensors[name].zero_point),
            )
        return self.act(name, shapes[name])

    def op_mul(self, node: QNode, shapes) -> None:
        a, b_ = node.inputs
        out = node.outputs[0]
        self.check(
            node,
            "(multiplier, shift)",
            tfl_mul_multiplier(self.scale(a), self.scale(b_), self.scale(out)),
            (node.attrs["multiplier"], node.attrs["shift"]),
        )
        ta, tb = self._operand(a, shapes), self._operand(b_, shapes)
        t_out, act, extra = self.out_or_pre(node, shapes[out])
        self.op(MUL, [ta, tb], [t_out], ("MulOptions", {"FusedActivationFunction": act}))
        self.finish_clamp(node, t_out, extra, shapes[out])

    def _pool(self, node: QNode, shapes, code: int) -> None:
        a = node.attrs
        x, out = node.inputs[0], node.outputs[0]
        if (self.scale(x), self.zp(x)) != (self.scale(out), self.zp(out)):
            raise ExportError(
                f"{CONTEXT}: node {node.name!r} ({node.op}) changes quantization; TFLite pools need "
                "the same scale and zero point in and out"
            )
        kernel, strides = list(a["kernel"]), list(a.get("strides", a["kernel"]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        t_in = self.act(x, shapes[x])
        padding = self._padding(
            node, t_in, x, shapes[x], kernel, strides, (1, 1), pads, fill=-128 if code == MAX_POOL_2D else None
        )
        if isinstance(padding, tuple):
            t_in, padding = padding
        t_out, act, extra = self.out_or_pre(node, shapes[out])
        self.op(
            code,
            [t_in],
            [t_out],
            (
                "Pool2DOptions",
                {
                    "Padding": padding,
                    "StrideW": strides[1],
                    "StrideH": strides[0],
                    "FilterWidth": kernel[1],
                    "FilterHeight": kernel[0],
                    "FusedActivationFunction": act,
                },
            ),
        )
        self.finish_clamp(node, t_out, extra, shapes[out])

    def op_avgpool(self, node: QNode, shapes) -> None:
        self._pool(node, shapes, AVERAGE_POOL_2D)

    def op_maxpool(self, node: QNode, shapes) -> None:
        self._pool(node, shapes, MAX_POOL_2D)

    def _requant(self, node: QNode, src: str, t_src: int, dst_t: int, m: int, s: int) -> None:
        self.check(
            node, f"rescale of {src!r}", tfl_requant_multiplier(self.scale(src), self.scale(node.outputs[0])), (m, s)
        )
        self.op(QUANTIZE, [t_src], [dst_t])

    def op_requantize(self, node: QNode, shapes) -> None:
        x, out = node.inputs[0], node.outputs[0]
        lo, hi = int(node.attrs.get("act_min", -128)), int(node.attrs.get("act_max", 127))
        t_in = self.act(x, shapes[x])
        if (lo, hi) == (-128, 127):
            dst = self.act(out, shapes[out])
        else:
            dst = self.tmp(f"{out}/unclamped", shapes[out], self.scale(out), self.zp(out))
        self._requant(node, x, t_in, dst, int(node.attrs["multiplier"]), int(node.attrs["shift"]))
        if (lo, hi) != (-128, 127):
            self.clamp(dst, out, lo, hi, shapes[out])

    def op_concat(self, node: QNode, shapes) -> None:
        a, out = node.attrs, node.outputs[0]
        parts = []
        for name, m, s in zip(node.inputs, a["multipliers"], a["shifts"], strict=True):
            t = self.act(name, shapes[name])
            if m is None:
                if (self.scale(name), self.zp(name)) != (self.scale(out), self.zp(out)):
                    raise ExportError(
                        f"{CONTEXT}: node {node.name!r}: input {name!r} is copied but its "
                        "quantization differs from the output's"
                    )
            else:
                r = self.tmp(f"{out}/{name}/rescaled", shapes[name], self.scale(out), self.zp(out))
                self._requant(node, name, t, r, int(m), int(s))
                t = r
            parts.append(t)
        axis = int(a["axis"])
        self.op(
            CONCATENATION,
            parts,
            [self.act(out, shapes[out])],
            ("ConcatenationOptions", {"Axis": axis, "FusedActivationFunction": ACT_NONE}),
        )

    def op_pad(self, node: QNode, shapes) -> None:
        x, out = node.inputs[0], node.outputs[0]
        if (self.scale(x), self.zp(x)) != (self.scale(out), self.zp(out)):
            raise ExportError(f"{CONTEXT}: node {node.name!r} (pad) changes quantization")
        pads = np.asarray(node.attrs["pads"], dtype=np.int32).reshape(-1, 2)
        pt = self.g.const(f"{node.name}/paddings", pads)
        self.op(PAD, [self.act(x, shapes[x]), pt], [self.act(out, shapes[out])])

    def op_reshape(self, node: QNode, shapes) -> None:
        x, out = node.inputs[0], node.outputs[0]
        new = [-1 if d is None else int(d) for d in node.attrs["shape"]]
        if self.batch is not None or not self.dynamic_batch:
            new = list(shapes[out])
        st = self.g.const(f"{node.name}/shape", np.asarray(new, np.int32))
        self.op(
            RESHAPE,
            [self.act(x, shapes[x]), st],
            [self.act(out, shapes[out])],
            ("ReshapeOptions", {"NewShape": _vec_i32_deferred(new)}),
        )

    def op_transpose(self, node: QNode, shapes) -> None:
        x, out = node.inputs[0], node.outputs[0]
        pt = self.g.const(f"{node.name}/perm", np.asarray(node.attrs["perm"], np.int32))
        self.op(TRANSPOSE, [self.act(x, shapes[x]), pt], [self.act(out, shapes[out])])

    def op_clamp(self, node: QNode, shapes) -> None:
        x, out = node.inputs[0], node.outputs[0]
        lo, hi = int(node.attrs.get("act_min", -128)), int(node.attrs.get("act_max", 127))
        self.clamp(self.act(x, shapes[x]), out, lo, hi, shapes[out])

    def op_lut(self, node: QNode, shapes) -> None:
        """LOGISTIC / HARD_SWISH where LiteRT's kernel is measured to give exactly the table, else
        table[q + 128] as CAST(int8 -> int32) + ADD(128) + GATHER (exact for any table)."""
        x, out = node.inputs[0], node.outputs[0]
        table = np.asarray(self.qm.constants[node.params["table"]]).astype(np.int8).reshape(256)
        shp = shapes[x]
        t_in = self.act(x, shp)
        code = NATIVE_LUTS.get(str(node.attrs.get("function", "")).lower())
        if (
            self.native_luts
            and code is not None
            and native_lut_is_exact(code, (self.scale(x), self.zp(x)), (self.scale(out), self.zp(out)), table)
        ):
            self.op(code, [t_in], [self.act(out, shapes[out])])
            return
        idx32 = self.tmp(f"{node.name}/index_raw", shp, None, 0, np.int32)
        self.op(CAST, [t_in], [idx32])
        off = self.g.const(f"{node.name}/offset", np.array([128], np.int32))
        idx = self.tmp(f"{node.name}/index", shp, None, 0, np.int32)
        self.op(ADD, [idx32, off], [idx], ("AddOptions", {"FusedActivationFunction": ACT_NONE}))
        tab = self.g.const(node.params["table"], table, scale=self.scale(out), zero_point=self.zp(out))
        self.op(GATHER, [tab, idx], [self.act(out, shapes[out])], ("GatherOptions", {"Axis": 0, "BatchDims": 0}))


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def to_tflite_bytes(
    qm: QuantModel,
    *,
    batch: int | None = None,
    float_input: bool = False,
    float_outputs: bool = False,
    native_luts: bool = True,
) -> tuple[bytes, dict[str, Any]]:
    """The .tflite flatbuffer of ``qm`` and the metadata embedded in it.

    ``batch=None`` keeps the batch axis dynamic (shape 1, signature -1); ``batch=1`` fixes it
    (what microcontroller runtimes and Vela want). ``native_luts`` maps sigmoid/hardswish tables
    to LOGISTIC/HARD_SWISH when LiteRT's kernel is measured to match them exactly.
    """
    return _Exporter(
        qm, batch=batch, float_input=float_input, float_outputs=float_outputs, native_luts=native_luts
    ).run()


def export_tflite(qm: QuantModel, out: str | Path, **options: Any) -> dict[str, Any]:
    """Write ``qm`` as a .tflite file; returns a JSON-able summary."""
    data, meta = to_tflite_bytes(qm, **options)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    ops = summarize_ops(data)
    return {"format": "tflite", "path": str(out), "bytes": len(data), "operators": ops, "metadata": meta}


def summarize_ops(data: bytes) -> dict[str, int]:
    """Operator counts of a .tflite flatbuffer, by builtin name."""
    import tflite
    from tflite.BuiltinOperator import BuiltinOperator

    names = {v: k for k, v in BuiltinOperator.__dict__.items() if not k.startswith("_")}
    m = tflite.Model.GetRootAsModel(data, 0)
    counts: dict[str, int] = {}
    for si in range(m.SubgraphsLength()):
        sg = m.Subgraphs(si)
        for i in range(sg.OperatorsLength()):
            oc = m.OperatorCodes(sg.Operators(i).OpcodeIndex())
            code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
            name = names.get(code, str(code))
            if name == "CUSTOM":
                name = f"CUSTOM:{oc.CustomCode().decode()}"
            counts[name] = counts.get(name, 0) + 1
    return counts


def read_metadata(data: bytes) -> dict[str, Any] | None:
    """The edgekit metadata JSON embedded in a .tflite file, if any."""
    import tflite

    m = tflite.Model.GetRootAsModel(data, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() == b"edgekit":
            buf = m.Buffers(md.Buffer()).DataAsNumpy()
            return json.loads(bytes(buf).decode())
    return None


def make_interpreter(model: bytes | str | Path, *, xnnpack: bool = False, num_threads: int = 1):
    """A LiteRT interpreter with builtin kernels only (``xnnpack=False``) or LiteRT's default."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw: dict[str, Any] = {"num_threads": num_threads}
    if isinstance(model, (bytes, bytearray)):
        kw["model_content"] = bytes(model)
    else:
        kw["model_path"] = str(model)
    kw["experimental_op_resolver_type"] = (
        OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    return Interpreter(**kw)


def run_tflite(model: bytes | str | Path, x: np.ndarray, *, xnnpack: bool = False, batch: int = 250) -> np.ndarray:
    """Run a single-input, single-output .tflite on ``x`` in batches; returns the raw output."""
    it = make_interpreter(model, xnnpack=xnnpack)
    inp = it.get_input_details()[0]
    outs = []
    dynamic = len(inp.get("shape_signature", [])) and inp["shape_signature"][0] == -1
    step = batch if dynamic else int(inp["shape"][0])
    cur = None
    for s in range(0, len(x), step):
        part = np.ascontiguousarray(x[s : s + step]).astype(inp["dtype"])
        if dynamic and cur != len(part):
            it.resize_tensor_input(inp["index"], [len(part), *inp["shape"][1:]])
            it.allocate_tensors()
            cur = len(part)
        elif cur is None:
            it.allocate_tensors()
            cur = len(part)
        it.set_tensor(inp["index"], part)
        it.invoke()
        outs.append(it.get_tensor(it.get_output_details()[0]["index"]).copy())
    return np.concatenate(outs)


def quantize_input(qm: QuantModel, x: np.ndarray) -> np.ndarray:
    """The int8 input tensor the exported model takes, from the float/raw input (reference rule)."""
    from edgekit.reference import OPS

    node = next(n for n in qm.nodes if n.op == "quantize" and n.inputs[0] == qm.inputs[0])
    return OPS["quantize"](qm, node, {node.inputs[0]: np.asarray(x, dtype=np.float32)})


__all__ = [
    "export_tflite",
    "to_tflite_bytes",
    "run_tflite",
    "make_interpreter",
    "read_metadata",
    "summarize_ops",
    "quantize_input",
    "solve_weight_scale",
    "ExportError",
]
