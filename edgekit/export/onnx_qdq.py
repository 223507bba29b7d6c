"""Export a QuantModel to ONNX in QDQ form (static per-tensor int8 activations, per-channel int8
weights, int32 biases), which onnxruntime fuses into its integer kernels (QLinearConv,
QLinearAdd, QLinearMatMul/QGemm, QLinearAveragePool...).

The graph keeps the QuantModel's interface: an int8 NHWC input (the output of its input
``quantize``) and int8 outputs (the integer logits; the float epilogue is recorded in the
metadata). Inside, 4-D activations are carried NCHW as ONNX operators expect.

onnxruntime requantizes with a float32 multiplier (and rounds half to even), not with the
dyadic integer rule, so its outputs are close to, not identical with, the reference executor's:
``compare_onnxruntime`` measures by how much.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UnsupportedOpsError
from edgekit.export.tflite import ExportError, _weight_scales
from edgekit.qmodel import QNode, QuantModel

CONTEXT = "ONNX export"
OPSET = 13
IR_VERSION = 8  # onnxruntime 1.31 rejects onnx 1.23's default IR 14
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
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class _OnnxBuilder:
    def __init__(self, qm: QuantModel, activations: str = "uint8"):
        import onnx  # noqa: F401

        if activations not in ("uint8", "int8"):
            raise ExportError(f"{CONTEXT}: activations must be 'uint8' or 'int8', not {activations!r}")
        self.qm = qm
        # uint8 activations (value + 128, zero point + 128: the same real numbers) are what
        # onnxruntime fuses into integer kernels on x86 (U8S8); int8 ones stay float there
        self.dt = np.uint8 if activations == "uint8" else np.int8
        self.off = 128 if activations == "uint8" else 0
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.layout: dict[str, str] = {}  # tensor -> "nchw" | "plain" (as in the QuantModel)
        self.alias: dict[str, str] = {}  # QuantModel tensor -> ONNX tensor, where they differ
        self.names: set[str] = set()
        self.k = 0

    # -- helpers --------------------------------------------------------------------
    def uniq(self, base: str) -> str:
        self.k += 1
        name = f"{base}__{self.k}"
        self.names.add(name)
        return name

    def const(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.uniq(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(
        self,
        op: str,
        ins: list[str],
        outs: list[str] | None = None,
        name: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        from onnx import helper

        outs = outs or [self.uniq(f"{name or op}:out")]
        self.nodes.append(helper.make_node(op, ins, outs, name=self.uniq(name or op), domain=domain, **attrs))
        return outs[0]

    def qparams(self, t: str) -> tuple[str, str]:
        info = self.qm.tensors[t]
        return (
            self.const(f"{t}:scale", np.array(info.scale, np.float32)),
            self.const(f"{t}:zero_point", np.array(info.zero_point + self.off, self.dt)),
        )

    def v(self, t: str) -> str:
        """The ONNX name carrying QuantModel tensor ``t``."""
        return self.alias.get(t, t)

    def dq(self, t: str, src: str | None = None) -> str:
        """Dequantize ``t`` (or the ONNX tensor ``src`` holding it in another layout)."""
        s, z = self.qparams(t)
        return self.node("DequantizeLinear", [src or self.v(t), s, z], name=f"{t}:dq")

    def q(self, f: str, t: str) -> str:
        s, z = self.qparams(t)
        return self.node("QuantizeLinear", [f, s, z], [t], name=f"{t}:q")

    def q_act(self, f: str, node: QNode, out: str) -> None:
        """Quantize ``f`` into ``out``, then clamp to (act_min, act_max) with an int8 Clip.

        Clamping the int8 result equals clamping before Q (Q is monotone), and keeps the
        DQ -> op -> Q pattern onnxruntime fuses into its integer kernels.
        """
        lo, hi = int(node.attrs.get("act_min", -128)), int(node.attrs.get("act_max", 127))
        if (lo, hi) == (-128, 127):
            self.q(f, out)
            return
        s, z = self.qparams(out)
        pre = self.node("QuantizeLinear", [f, s, z], name=f"{out}:q")
        self.node(
            "Clip",
            [
                pre,
                self.const(f"{node.name}:min", np.array(lo + self.off, self.dt)),
                self.const(f"{node.name}:max", np.array(hi + self.off, self.dt)),
            ],
            [out],
            name=f"{node.name}:clamp",
        )

    def as_plain(self, t: str) -> str:
        """The ONNX name of ``t`` in the QuantModel's own (NHWC) layout."""
        if self.layout.get(t) == "nchw":
            return self.node("Transpose", [self.v(t)], name=f"{t}:to_nhwc", perm=TO_NHWC)
        return self.v(t)

    def as_nchw(self, t: str) -> str:
        """The ONNX name of 4-D ``t`` in NCHW, transposing a tensor held in the model's NHWC layout
        (e.g. after an NCHW-born model's input transpose)."""
        if self.layout.get(t) == "nchw":
            return self.v(t)
        nchw = self.node("Transpose", [self.v(t)], name=f"{t}:to_nchw", perm=TO_NCHW)
        self.alias[t], self.layout[t] = nchw, "nchw"
        return nchw

    # -- ops ------------------------------------------------------------------------
    def op_conv2d(self, n: QNode) -> None:
        qm, a = self.qm, n.attrs
        x, out = n.inputs[0], n.outputs[0]
        w = np.asarray(qm.constants[n.params["weight"]]).astype(np.int8)
        o = w.shape[0]
        mult = np.broadcast_to(np.asarray(qm.constants[n.params["multiplier"]]).reshape(-1), (o,))
        shift = np.broadcast_to(np.asarray(qm.constants[n.params["shift"]]).reshape(-1), (o,))
        in_s, out_s = float(np.float32(qm.tensors[x].scale)), float(np.float32(qm.tensors[out].scale))
        w_s = _weight_scales(n, mult, shift, in_s, out_s)
        wq = self.const(f"{n.name}:weight", np.ascontiguousarray(w.transpose(0, 3, 1, 2)))
        ws = self.const(f"{n.name}:weight_scale", w_s)
        wz = self.const(f"{n.name}:weight_zp", np.zeros(o, np.int8))
        wf = self.node("DequantizeLinear", [wq, ws, wz], name=f"{n.name}:weight_dq", axis=0)
        bq = self.const(f"{n.name}:bias", np.asarray(qm.constants[n.params["bias"]]).astype(np.int32))
        bs = self.const(f"{n.name}:bias_scale", (w_s * np.float32(in_s)).astype(np.float32))
        bz = self.const(f"{n.name}:bias_zp", np.zeros(o, np.int32))
        bf = self.node("DequantizeLinear", [bq, bs, bz], name=f"{n.name}:bias_dq", axis=0)
        y = self.node(
            "Conv",
            [self.dq(x, self.as_nchw(x)), wf, bf],
            name=n.name,
            kernel_shape=list(w.shape[1:3]),
            strides=list(a.get("strides", [1, 1])),
            dilations=list(a.get("dilations", [1, 1])),
            pads=list(a.get("pads", [0, 0, 0, 0])),
            group=int(a.get("groups", 1)),
        )
        self.q_act(y, n, out)
        self.layout[out] = "nchw"

    def op_dense(self, n: QNode) -> None:
        qm = self.qm
        x, out = n.inputs[0], n.outputs[0]
        w = np.asarray(qm.constants[n.params["weight"]]).astype(np.int8)
        o = w.shape[0]
        mult = np.broadcast_to(np.asarray(qm.constants[n.params["multiplier"]]).reshape(-1), (o,))
        shift = np.broadcast_to(np.asarray(qm.constants[n.params["shift"]]).reshape(-1), (o,))
        in_s, out_s = float(np.float32(qm.tensors[x].scale)), float(np.float32(qm.tensors[out].scale))
        w_s = _weight_scales(n, mult, shift, in_s, out_s)
        wq = self.const(f"{n.name}:weight", np.ascontiguousarray(w.T))  # [K, O]
        wf = self.node(
            "DequantizeLinear",
            [wq, self.const(f"{n.name}:weight_scale", w_s), self.const(f"{n.name}:weight_zp", np.zeros(o, np.int8))],
            name=f"{n.name}:weight_dq",
            axis=1,
        )
        bq = self.const(f"{n.name}:bias", np.asarray(qm.constants[n.params["bias"]]).astype(np.int32))
        bf = self.node(
            "DequantizeLinear",
            [
                bq,
                self.const(f"{n.name}:bias_scale", (w_s * np.float32(in_s))),
                self.const(f"{n.name}:bias_zp", np.zeros(o, np.int32)),
            ],
            name=f"{n.name}:bias_dq",
            axis=0,
        )
        y = self.node("MatMul", [self.dq(x, self.as_plain(x)), wf], name=n.name)
        y = self.node("Add", [y, bf], name=f"{n.name}:bias_add")
        self.q_act(y, n, out)
        self.layout[out] = "plain"

    def _binary(self, n: QNode, op: str) -> None:
        a, b = n.inputs
        out = n.outputs[0]
        la, lb = self.layout.get(a, "plain"), self.layout.get(b, "plain")
        if la != lb:
            fa, fb = self.dq(a, self.as_plain(a)), self.dq(b, self.as_plain(b))
            lay = "plain"
        else:
            fa, fb = (self._operand(a), self._operand(b))
            lay = la
        y = self.node(op, [fa, fb], name=n.name)
        self.q_act(y, n, out)
        self.layout[out] = lay

    def _operand(self, t: str) -> str:
        if t in self.qm.constants and t not in self.names:
            arr = (np.asarray(self.qm.constants[t]).astype(np.int16) + self.off).astype(self.dt)
            return self.dq(t, self.const(t, arr))
        return self.dq(t)

    def op_add(self, n: QNode) -> None:
        self._binary(n, "Add")

    def op_mul(self, n: QNode) -> None:
        self._binary(n, "Mul")

    def op_avgpool(self, n: QNode) -> None:
        a = n.attrs
        x, out = n.inputs[0], n.outputs[0]
        y = self.node(
            "AveragePool",
            [self.dq(x, self.as_nchw(x))],
            name=n.name,
            kernel_shape=list(a["kernel"]),
            strides=list(a.get("strides", a["kernel"])),
            pads=list(a.get("pads", [0, 0, 0, 0])),
            count_include_pad=0,
        )
        self.q(y, out)
        self.layout[out] = "nchw"

    def op_maxpool(self, n: QNode) -> None:
        a = n.attrs
        x, out = n.inputs[0], n.outputs[0]
        # int8 MaxPool on raw values: padded cells ignored, same scale in and out
        self.node(
            "MaxPool",
            [self.as_nchw(x)],
            [out],
            name=n.name,
            kernel_shape=list(a["kernel"]),
            strides=list(a.get("strides", a["kernel"])),
            pads=list(a.get("pads", [0, 0, 0, 0])),
        )
        self.layout[out] = "nchw"
        lo, hi = int(a.get("act_min", -128)), int(a.get("act_max", 127))
        if (lo, hi) != (-128, 127):
            raise UnsupportedOpsError([("maxpool(with clamp)", n.name)], context=CONTEXT)

    def op_requantize(self, n: QNode) -> None:
        x, out = n.inputs[0], n.outputs[0]
        self.q_act(self.dq(x), n, out)
        self.layout[out] = self.layout.get(x, "plain")

    def op_concat(self, n: QNode) -> None:
        out = n.outputs[0]
        axis = int(n.attrs["axis"])
        lays = {self.layout.get(t, "plain") for t in n.inputs}
        rank = len(self.qm.tensors[out].shape)
        if lays == {"nchw"} and rank == 4:
            ins = [self.dq(t) for t in n.inputs]
            axis = TO_NCHW.index(axis % 4)
            lay = "nchw"
        else:
            ins = [self.dq(t, self.as_plain(t)) for t in n.inputs]
            lay = "plain"
        self.q(self.node("Concat", ins, name=n.name, axis=axis), out)
        self.layout[out] = lay

    def op_pad(self, n: QNode) -> None:
        x, out = n.inputs[0], n.outputs[0]
        pads = [list(p) for p in n.attrs["pads"]]
        if self.layout.get(x) == "nchw":
            pads = [pads[i] for i in TO_NCHW]
        flat = [p[0] for p in pads] + [p[1] for p in pads]
        zp = self.const(f"{n.name}:value", np.array(self.qm.tensors[out].zero_point + self.off, self.dt))
        self.node("Pad", [self.v(x), self.const(f"{n.name}:pads", np.array(flat, np.int64)), zp], [out], name=n.name)
        self.layout[out] = self.layout.get(x, "plain")

    def op_reshape(self, n: QNode) -> None:
        x, out = n.inputs[0], n.outputs[0]
        shape = [0 if d is None else int(d) for d in n.attrs["shape"]]
        self.node(
            "Reshape", [self.as_plain(x), self.const(f"{n.name}:shape", np.array(shape, np.int64))], [out], name=n.name
        )
        self.layout[out] = "plain"

    def op_transpose(self, n: QNode) -> None:
        x, out = n.inputs[0], n.outputs[0]
        self.node("Transpose", [self.as_plain(x)], [out], name=n.name, perm=list(n.attrs["perm"]))
        self.layout[out] = "plain"

    def op_clamp(self, n: QNode) -> None:
        x, out = n.inputs[0], n.outputs[0]
        lo = self.const(f"{n.name}:min", np.array(n.attrs.get("act_min", -128) + self.off, self.dt))
        hi = self.const(f"{n.name}:max", np.array(n.attrs.get("act_max", 127) + self.off, self.dt))
        self.node("Clip", [self.v(x), lo, hi], [out], name=n.name)
        self.layout[out] = self.layout.get(x, "plain")

    def op_lut(self, n: QNode) -> None:
        x, out = n.inputs[0], n.outputs[0]
        table = np.asarray(self.qm.constants[n.params["table"]]).astype(np.int16).reshape(256) + self.off
        table = table.astype(self.dt)
        idx = self.node("Cast", [self.v(x)], name=f"{n.name}:cast", to=6)  # INT32
        idx = self.node(
            "Add", [idx, self.const(f"{n.name}:offset", np.array(128 - self.off, np.int32))], name=f"{n.name}:index"
        )
        self.node("Gather", [self.const(f"{n.name}:table", table), idx], [out], name=n.name, axis=0)
        self.layout[out] = self.layout.get(x, "plain")

    # -- whole model ----------------------------------------------------------------
    def build(self, opset: int = OPSET):
        import onnx
        from onnx import TensorProto, helper

        qm = self.qm
        self.ttype = TensorProto.UINT8 if self.off else TensorProto.INT8
        bad = [(n.op, n.name) for n in qm.nodes if n.op not in SUPPORTED]
        if bad:
            raise UnsupportedOpsError(bad, context=CONTEXT)
        inputs = []
        for name in qm.inputs:
            qn = next((n for n in qm.nodes if n.op == "quantize" and n.inputs[0] == name), None)
            if qn is None:
                raise ExportError(f"{CONTEXT}: input {name!r} is not followed by a quantize node")
            t = qn.outputs[0]
            info = qm.tensors[t]
            shape = ["N" if d is None else int(d) for d in info.shape]
            inputs.append(helper.make_tensor_value_info(t, self.ttype, shape))
            self.names.add(t)
            if len(shape) == 4:
                self.alias[t] = self.node("Transpose", [t], name=f"{t}:to_nchw", perm=TO_NCHW)
                self.layout[t] = "nchw"
            else:
                self.layout[t] = "plain"
        for n in qm.nodes:
            if n.op != "quantize":
                getattr(self, f"op_{n.op}")(n)
        outputs = []
        for o in qm.outputs:
            t = o.name
            info = qm.tensors[t]
            final = t
            if self.layout.get(t) == "nchw":
                inner = self.uniq(f"{t}:nchw")
                for nd in self.nodes:  # rename the NCHW tensor, then transpose back under the real name
                    nd.output[:] = [inner if v == t else v for v in nd.output]
                    nd.input[:] = [inner if v == t else v for v in nd.input]
                self.layout[inner] = "nchw"
                self.node("Transpose", [inner], [t], name=f"{t}:to_nhwc", perm=TO_NHWC)
            shape = ["N" if d is None else int(d) for d in info.shape]
            outputs.append(helper.make_tensor_value_info(final, self.ttype, shape))
        graph = helper.make_graph(self.nodes, qm.name, inputs, outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgekit", producer_version=_version()
        )
        model.ir_version = IR_VERSION
        meta = {
            "edgekit_version": _version(),
            "model": qm.name,
            "content_hash": qm.content_hash(),
            "activations": np.dtype(self.dt).name,
            "value_offset": self.off,
            "outputs": [{"name": o.name, "epilogue": o.epilogue} for o in qm.outputs],
        }
        helper.set_model_props(model, {"edgekit": json.dumps(meta, sort_keys=True)})
        onnx.checker.check_model(model)
        return model


def _version() -> str:
    import edgekit

    return edgekit.__version__


def to_onnx(qm: QuantModel, activations: str = "uint8"):
    """The QDQ ``onnx.ModelProto`` of ``qm`` (IR 8, opset 13).

    ``activations="uint8"`` (default) stores every activation as uint8 = int8 value + 128 with
    zero point + 128 (the same real numbers); the input is then ``int8 input + 128`` (for
    images with input scale 1 and zero point -128: the raw uint8 pixels) and the outputs are
    ``int8 logits + 128``. ``"int8"`` keeps int8 tensors (onnxruntime runs them with float
    kernels on x86).
    """
    return _OnnxBuilder(qm, activations).build()


def export_onnx(qm: QuantModel, out: str | Path, activations: str = "uint8") -> dict[str, Any]:
    """Write ``qm`` as a QDQ .onnx file; returns a JSON-able summary."""
    import onnx

    model = to_onnx(qm, activations)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    ops: dict[str, int] = {}
    for nd in model.graph.node:
        ops[nd.op_type] = ops.get(nd.op_type, 0) + 1
    return {
        "format": "onnx",
        "path": str(out),
        "bytes": out.stat().st_size,
        "ir_version": model.ir_version,
        "activations": activations,
        "value_offset": 128 if activations == "uint8" else 0,
        "opset": OPSET,
        "operators": ops,
        "integer_kernels": integer_kernels(out),
    }


def make_session(model: str | Path | bytes, *, optimized_path: str | None = None):
    """An onnxruntime CPU session with all graph optimizations (QDQ -> QLinear fusion)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src = model if isinstance(model, (bytes, bytearray)) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def integer_kernels(model: str | Path | bytes) -> dict[str, int]:
    """The operators onnxruntime actually runs after its QDQ fusion (from the optimized graph)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        p = str(Path(d) / "opt.onnx")
        make_session(model, optimized_path=p)
        m = onnx.load(p)
    ops: dict[str, int] = {}
    for nd in m.graph.node:
        ops[nd.op_type] = ops.get(nd.op_type, 0) + 1
    return ops


def run_onnxruntime(model: str | Path | bytes, xq: np.ndarray, batch: int = 500) -> np.ndarray:
    """Run an exported model on the int8 input values; returns the int8 output values."""
    sess = make_session(model)
    inp = sess.get_inputs()[0]
    off = 128 if inp.type == "tensor(uint8)" else 0
    feed = (np.asarray(xq).astype(np.int16) + off).astype(np.uint8 if off else np.int8)
    out = np.concatenate(
        [sess.run(None, {inp.name: np.ascontiguousarray(feed[s : s + batch])})[0] for s in range(0, len(feed), batch)]
    )
    return (out.astype(np.int16) - off).astype(np.int8)


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How far integer outputs are from the reference: share equal, largest LSB gap, top-1 agreement."""
    d = np.abs(out.astype(np.int64) - ref.astype(np.int64))
    res = {
        "n": int(len(ref)),
        "equal_share": float((d == 0).mean()),
        "rows_identical": float((d.max(axis=-1) == 0).mean()),
        "max_lsb": int(d.max(initial=0)),
        "mean_lsb": float(d.mean()),
    }
    if ref.ndim == 2:
        res["top1_agreement"] = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return res
