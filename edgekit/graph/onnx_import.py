"""ONNX -> float IR.

Every NCHW operator (Conv, pooling) is emitted as its NHWC form between a pair of
transposes; ``passes.optimize_layout`` then cancels them, so an NHWC-born model (whose
ONNX carries a Transpose at the input) runs with no transpose at all, and an NCHW model
keeps one at its input. Nodes whose inputs are all constants are folded with onnx's own
reference evaluator.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.errors import ModelFormatError, UnsupportedOpsError
from edgekit.graph.ir import Graph, Node

MIN_OPSET, MAX_OPSET = 11, 21
NCHW_TO_NHWC = [0, 2, 3, 1]
NHWC_TO_NCHW = [0, 3, 1, 2]


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelFormatError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise ModelFormatError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        # onnxruntime runs models whose outputs lack type details; only structural faults stop us
        first = str(exc).strip().splitlines()[0]
        if "shape" not in first and "type" not in first:
            raise ModelFormatError(f"{path}: the ONNX model is invalid: {first}") from exc
    return model


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


class _Importer:
    def __init__(self, model: onnx.ModelProto, name: str):
        self.opset = _opset(model)
        self.model = model
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[int | None]] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.alias: dict[str, str] = {}
        inputs = [i.name for i in g.input if i.name not in self.consts]
        self.graph = Graph(name=name, inputs=inputs, outputs=[o.name for o in g.output], nodes=[])
        for i in g.input:
            if i.name in self.consts:
                continue
            t = i.type.tensor_type
            if t.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8):
                raise ModelFormatError(f"input {i.name!r} has element type {t.elem_type}; edgekit imports float models")
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            for ax, d in enumerate(dims[1:], start=1):
                if d is None:
                    raise ModelFormatError(
                        f"input {i.name!r} has a dynamic size on axis {ax}: edgekit needs static shapes except the "
                        "batch axis; re-export the model with a fixed input size"
                    )
            self.graph.input_shapes[i.name] = [None] + dims[1:] if dims else []
        self.unsupported: list[tuple[str, str]] = []

    # ---- helpers ----------------------------------------------------------------------
    def name(self, t: str) -> str:
        while t in self.alias:
            t = self.alias[t]
        return t

    def const(self, t: str) -> np.ndarray | None:
        return self.consts.get(self.name(t)) if t else None

    def rank(self, t: str) -> int | None:
        s = self.shapes.get(t)
        return None if s is None else len(s)

    def emit(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        self.graph.nodes.append(Node(op, name, inputs, [output], attrs))
        return output

    def add_const(self, base: str, value: np.ndarray) -> str:
        n = self.graph.fresh(base)
        self.graph.constants[n] = np.asarray(value, dtype=np.float32)
        return n

    def nhwc(self, x: str, node_name: str, op: str, out: str, **attrs: Any) -> None:
        """Emit ``op`` in NHWC between transposes, reading and writing NCHW tensors."""
        t_in = self.emit("transpose", [x], self.graph.fresh(x + ":nhwc"), node_name + ":to_nhwc", perm=NCHW_TO_NHWC)
        y = self.emit(op, [t_in], self.graph.fresh(out + ":nhwc"), node_name, **attrs)
        self.emit("transpose", [y], out, node_name + ":to_nchw", perm=NHWC_TO_NCHW)

    # ---- main loop --------------------------------------------------------------------
    def run(self) -> Graph:
        for node in self.model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            ins = [self.name(i) if i else "" for i in node.input]
            if node.op_type == "Constant":
                self.consts[node.output[0]] = _constant_value(node)
                continue
            if all((not i) or i in self.consts for i in ins) and node.op_type not in ("Identity",):
                try:
                    self._fold(node, ins)
                    continue
                except Exception:
                    pass  # fall through: handled (or reported) below
            handler = getattr(self, "op_" + node.op_type, None)
            label = node.name or f"{node.op_type}->{node.output[0]}"
            if handler is None:
                self.unsupported.append((node.op_type, label))
                continue
            try:
                handler(node, ins, attrs, label)
            except _Unsupported as exc:
                self.unsupported.append((f"{node.op_type} ({exc})", label))
        if self.unsupported:
            raise UnsupportedOpsError(self.unsupported, context="edgekit (ONNX import)")
        self.graph.outputs = [self.name(o) for o in self.graph.outputs]
        for o in self.graph.outputs:
            if o in self.consts:
                raise ModelFormatError(f"output {o!r} is a constant; nothing to quantize")
        return self.graph

    def _fold(self, node: onnx.NodeProto, ins: list[str]) -> None:
        from onnx.reference import ReferenceEvaluator

        inputs = [
            helper.make_tensor_value_info(i or f"__empty{k}", onnx.TensorProto.UNDEFINED, None)
            for k, i in enumerate(ins)
        ]
        renamed = helper.make_node(node.op_type, [i for i in ins], list(node.output), domain=node.domain)
        renamed.attribute.extend(node.attribute)
        g = helper.make_graph(
            [renamed],
            "fold",
            [v for v in inputs if not v.name.startswith("__empty")],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        feeds = {i: self.consts[i] for i in ins if i}
        outs = ReferenceEvaluator(m).run(None, feeds)
        for o, v in zip(node.output, outs, strict=True):
            self.consts[o] = np.asarray(v)

    def _operand(self, t: str, base: str) -> str:
        """A tensor name usable as an IR input; constants are copied into the graph."""
        c = self.const(t)
        return self.add_const(base, c) if c is not None else self.name(t)

    # ---- operators --------------------------------------------------------------------
    def op_Identity(self, node, ins, attrs, label):
        self.alias[node.output[0]] = ins[0]
        if ins[0] in self.consts:
            self.consts[node.output[0]] = self.consts[ins[0]]

    op_Dropout = op_Identity

    def op_Conv(self, node, ins, attrs, label):
        w = self.const(ins[1])
        if w is None:
            raise _Unsupported("weights are not constant")
        if w.ndim != 4:
            raise _Unsupported(f"{w.ndim - 2}-D convolution; only 2-D is supported")
        b = self.const(ins[2]) if len(ins) > 2 and ins[2] else np.zeros(w.shape[0], np.float32)
        kh, kw = w.shape[2:]
        strides = list(attrs.get("strides", [1, 1]))
        dil = list(attrs.get("dilations", [1, 1]))
        pads = self._pads(ins[0], attrs, (kh, kw), strides, dil)
        self.nhwc(
            ins[0],
            label,
            "conv2d",
            node.output[0],
            weight=np.ascontiguousarray(w.transpose(0, 2, 3, 1)).astype(np.float32),
            bias=np.asarray(b, np.float32),
            strides=strides,
            dilations=dil,
            pads=pads,
            groups=int(attrs.get("group", 1)),
        )

    def _pads(self, x: str, attrs, kernel, strides, dil) -> list[int]:
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("NOTSET", ""):
            p = list(attrs.get("pads", [0, 0, 0, 0]))
            return [p[0], p[1], p[2], p[3]]
        if auto == "VALID":
            return [0, 0, 0, 0]
        shape = self.shapes.get(x)
        if shape is None or None in shape[2:]:
            raise _Unsupported("auto_pad SAME needs a static input shape")
        pads = []
        for size, k, s, d in zip(shape[2:], kernel, strides, dil, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]

    def _pool(self, node, ins, attrs, label, op):
        kernel = list(attrs["kernel_shape"])
        if len(kernel) != 2:
            raise _Unsupported(f"{len(kernel)}-D pooling; only 2-D is supported")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise _Unsupported("dilated pooling")
        strides = list(attrs.get("strides", [1, 1]))
        pads = self._pads(ins[0], attrs, kernel, strides, [1, 1])
        if attrs.get("ceil_mode", 0):
            shape = self.shapes.get(ins[0])
            for ax, (size, k, s) in enumerate(zip(shape[2:], kernel, strides, strict=True)):
                total = size + pads[ax] + pads[ax + 2]
                extra = (-(-(total - k) // s)) * s + k - total
                pads[ax + 2] += max(extra, 0)
        x = ins[0]
        if op == "avgpool" and attrs.get("count_include_pad", 0) and any(pads):
            padded = self.graph.fresh(x + ":padded")
            self.emit(
                "pad",
                [x],
                padded,
                label + ":pad",
                pads=[[0, 0], [0, 0], [pads[0], pads[2]], [pads[1], pads[3]]],
                value=0.0,
            )
            x, pads = padded, [0, 0, 0, 0]
        self.nhwc(x, label, op, node.output[0], kernel=kernel, strides=strides, pads=pads)

    def op_MaxPool(self, node, ins, attrs, label):
        if len(node.output) > 1 and node.output[1]:
            raise _Unsupported("the Indices output")
        self._pool(node, ins, attrs, label, "maxpool")

    def op_AveragePool(self, node, ins, attrs, label):
        self._pool(node, ins, attrs, label, "avgpool")

    def op_GlobalAveragePool(self, node, ins, attrs, label):
        shape = self.shapes.get(ins[0])
        if shape is None or len(shape) != 4 or None in shape[2:]:
            raise _Unsupported("needs a static 4-D input")
        self.nhwc(ins[0], label, "avgpool", node.output[0], kernel=list(shape[2:]), strides=[1, 1], pads=[0, 0, 0, 0])

    def op_Gemm(self, node, ins, attrs, label):
        if attrs.get("transA", 0):
            raise _Unsupported("transA=1")
        w = self.const(ins[1])
        if w is None:
            raise _Unsupported("B is not constant")
        w = w if attrs.get("transB", 0) else w.T
        w = w * attrs.get("alpha", 1.0)
        c = self.const(ins[2]) if len(ins) > 2 and ins[2] else None
        if len(ins) > 2 and ins[2] and c is None:
            raise _Unsupported("C is not constant")
        bias = (
            np.zeros(w.shape[0], np.float32)
            if c is None
            else np.broadcast_to(c * attrs.get("beta", 1.0), (w.shape[0],))
        )
        self.emit(
            "dense",
            [ins[0]],
            node.output[0],
            label,
            weight=np.ascontiguousarray(w, np.float32),
            bias=np.array(bias, np.float32),
        )

    def op_MatMul(self, node, ins, attrs, label):
        w = self.const(ins[1])
        if w is None or w.ndim != 2:
            raise _Unsupported("the second operand must be a constant matrix")
        self.emit(
            "dense",
            [ins[0]],
            node.output[0],
            label,
            weight=np.ascontiguousarray(w.T, np.float32),
            bias=np.zeros(w.shape[1], np.float32),
        )

    def _binary(self, node, ins, label, op):
        a, b = ins
        ca, cb = self.const(a), self.const(b)
        if ca is not None and op in ("add", "mul"):
            a, b, ca, cb = b, a, cb, ca
        if ca is not None:
            raise _Unsupported("constant first operand")
        if node.op_type == "Sub":
            if cb is None:
                raise _Unsupported("difference of two tensors")
            cb = -cb
        if node.op_type == "Div":
            if cb is None:
                raise _Unsupported("division by a tensor")
            cb = 1.0 / cb
        rb = self.add_const(label + ":const", cb) if cb is not None else b
        self.emit(op, [a, rb], node.output[0], label)

    def op_Add(self, node, ins, attrs, label):
        self._binary(node, ins, label, "add")

    def op_Sub(self, node, ins, attrs, label):
        self._binary(node, ins, label, "add")

    def op_Mul(self, node, ins, attrs, label):
        self._binary(node, ins, label, "mul")

    def op_Div(self, node, ins, attrs, label):
        self._binary(node, ins, label, "mul")

    def op_Relu(self, node, ins, attrs, label):
        self.emit("relu", [ins[0]], node.output[0], label)

    def op_Clip(self, node, ins, attrs, label):
        lo = attrs.get("min", -np.inf)
        hi = attrs.get("max", np.inf)
        if len(ins) > 1 and ins[1]:
            c = self.const(ins[1])
            if c is None:
                raise _Unsupported("min is not constant")
            lo = float(c)
        if len(ins) > 2 and ins[2]:
            c = self.const(ins[2])
            if c is None:
                raise _Unsupported("max is not constant")
            hi = float(c)
        self.emit("clip", [ins[0]], node.output[0], label, min=float(lo), max=float(hi))

    def op_Sigmoid(self, node, ins, attrs, label):
        self.emit("sigmoid", [ins[0]], node.output[0], label)

    def op_HardSwish(self, node, ins, attrs, label):
        self.emit("hardswish", [ins[0]], node.output[0], label)

    def op_Softmax(self, node, ins, attrs, label):
        r = self.rank(ins[0])
        axis = attrs.get("axis", -1 if self.opset >= 13 else 1)
        if r is None:
            raise _Unsupported("unknown input rank")
        axis = axis % r
        if self.opset < 13 and axis != r - 1:
            raise _Unsupported("opset<13 softmax over flattened trailing axes")
        self.emit("softmax", [ins[0]], node.output[0], label, axis=axis)

    def op_Concat(self, node, ins, attrs, label):
        r = self.rank(node.output[0]) or self.rank(ins[0])
        axis = attrs["axis"] % r
        self.emit("concat", [self._operand(i, label + ":const") for i in ins], node.output[0], label, axis=axis)

    def _reshape_to(self, node, x, label) -> None:
        out = self.shapes.get(node.output[0])
        if out is None or None in out[1:]:
            raise _Unsupported("output shape is not static")
        self.emit("reshape", [x], node.output[0], label, shape=[None] + list(out[1:]))

    def op_Reshape(self, node, ins, attrs, label):
        target = self.const(ins[1])
        if target is None:
            raise _Unsupported("the shape is not constant")
        out = self.shapes.get(node.output[0])
        src = self.shapes.get(ins[0])
        if (out is None or None in out[1:]) and src is not None and None not in src[1:]:
            # the target came from folded constants, which ONNX shape inference could not see
            dims = [src[i] if int(t) == 0 else int(t) for i, t in enumerate(target)]
            resolved = np.empty([1] + list(src[1:]), np.uint8).reshape([1 if i == 0 else d for i, d in enumerate(dims)])
            self.shapes[node.output[0]] = [None] + list(resolved.shape[1:])
        self._reshape_to(node, ins[0], label)

    op_Flatten = op_Squeeze = op_Unsqueeze = lambda self, node, ins, attrs, label: self._reshape_to(node, ins[0], label)

    def op_Transpose(self, node, ins, attrs, label):
        perm = list(attrs.get("perm", reversed(range(self.rank(ins[0]) or 0))))
        self.emit("transpose", [ins[0]], node.output[0], label, perm=perm)

    def op_Pad(self, node, ins, attrs, label):
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise _Unsupported(f"mode {mode!r}")
        pads = self.const(ins[1]) if len(ins) > 1 else np.array(attrs.get("pads"))
        if pads is None:
            raise _Unsupported("pads are not constant")
        if len(ins) > 3 and ins[3]:
            raise _Unsupported("the axes input")
        value = float(self.const(ins[2])) if len(ins) > 2 and ins[2] else float(attrs.get("value", 0.0))
        r = len(pads) // 2
        self.emit(
            "pad",
            [ins[0]],
            node.output[0],
            label,
            pads=[[int(pads[i]), int(pads[i + r])] for i in range(r)],
            value=value,
        )

    def op_BatchNormalization(self, node, ins, attrs, label):
        scale, bias, mean, var = (self.const(i) for i in ins[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            raise _Unsupported("statistics are not constant")
        r = self.rank(ins[0]) or 4
        a = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
        b = bias - mean * a
        shape = [1, -1] + [1] * (r - 2)
        mid = self.graph.fresh(node.output[0] + ":scaled")
        self.emit("mul", [ins[0], self.add_const(label + ":scale", a.reshape(shape))], mid, label + ":scale")
        self.emit("add", [mid, self.add_const(label + ":shift", b.reshape(shape))], node.output[0], label)


class _Unsupported(Exception):
    """A supported op type used in a way edgekit cannot handle (the message says how)."""


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(helper.get_attribute_value(a))
        if a.name in ("value_floats", "value_ints"):
            return np.array(helper.get_attribute_value(a))
    raise ModelFormatError(f"Constant node {node.name!r} has no supported value attribute")


def import_onnx(path: str | Path) -> Graph:
    """Load an ONNX file into the float IR, canonicalised (see ``passes.canonicalize``)."""
    from edgekit.graph.passes import canonicalize

    path = Path(path)
    model = read_onnx(path)
    opset = _opset(model)
    if opset < MIN_OPSET:
        from onnx import version_converter

        model = version_converter.convert_version(model, 13)
    elif opset > MAX_OPSET:
        raise ModelFormatError(f"{path}: opset {opset} is newer than edgekit supports ({MIN_OPSET}-{MAX_OPSET})")
    graph = _Importer(model, path.stem).run()
    graph.source = {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "format": "onnx",
        "opset": opset,
    }
    return canonicalize(graph)
