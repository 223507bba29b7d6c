"""Lowering: a QuantModel (integer NHWC graph) -> a Relax IRModule whose ``main`` takes the
quantized int8 input tensor(s) and returns the int8 output tensor(s).

Each operator becomes one TE kernel from ``kernels/`` (emitted with ``emit_te``, so one
PrimFunc per node, epilogue fused), except that a residual add whose operand comes from a conv2d
read by nothing else is computed in that conv's epilogue (``fusion.residual_fusions``: one kernel,
family ``<conv family>_add``, named after the add); weights and per-channel rescales become constants baked
into the compiled library (int4 weights stay packed two per byte and are unpacked in-kernel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from edgekit.compile.fusion import FUSED_SUFFIX, residual_fusions
from edgekit.errors import UnsupportedOpsError
from edgekit.qmodel import QNode, QuantModel
from kernels import conv2d as kconv
from kernels import dense as kdense
from kernels import depthwise as kdw
from kernels import elementwise as kew
from kernels import int4 as kint4
from kernels import layout as klayout
from kernels import pool as kpool
from kernels import requant as kreq
from kernels import space as kspace
from kernels import tensorize as ktz

SUPPORTED = {
    "quantize",
    "conv2d",
    "dense",
    "add",
    "mul",
    "requantize",
    "maxpool",
    "avgpool",
    "concat",
    "pad",
    "reshape",
    "transpose",
    "lut",
    "clamp",
}


@dataclass
class Lowered:
    """The Relax module plus what the manifest needs to know."""

    mod: tvm.IRModule
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    weight_bytes: int = 0  # bytes of weight constants as stored in the library
    kernels: dict[str, str] = field(default_factory=dict)  # primfunc -> kernel family
    unscheduled: tvm.IRModule | None = None  # ``mod`` before the default schedules (what tuning starts from)


def _name(s: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", s)[:48]


def _vec(a, n: int, dtype: str = "int32") -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(np.asarray(a), (n,)).astype(dtype))


def check_supported(qm: QuantModel) -> None:
    bad = [(n.op, n.name) for n in qm.nodes if n.op not in SUPPORTED]
    for n in qm.nodes:
        if n.op == "quantize" and n.inputs[0] not in qm.inputs:
            bad.append(("quantize (inside the graph)", n.name))
    if bad:
        raise UnsupportedOpsError(bad, context="edgekit compile (TVM)")


class _Lowerer:
    def __init__(self, qm: QuantModel, batch: int, intrin: str | None = None, threads: int = 1):
        self.qm = qm
        self.batch = batch
        self.intrin = intrin
        self.threads = threads
        self.scheduled: dict[str, tuple[str, str]] = {}  # primfunc name hint -> (schedule kind, intrinsic)
        self.bb = relax.BlockBuilder()
        self.env: dict[str, relax.Expr] = {}
        self.weight_bytes = 0
        self.kernels: dict[str, str] = {}
        self.last_hint = ""
        # residual adds computed in the epilogue of the conv producing one operand: add -> (conv, operand)
        self.fusions = residual_fusions(qm)
        self.fused_convs = {conv for conv, _ in self.fusions.values()}
        self.nodes = {n.name: n for n in qm.nodes}

    def zp(self, t: str) -> int:
        return int(self.qm.tensors[t].zero_point or 0)

    def val(self, t: str) -> relax.Expr:
        if t in self.env:
            return self.env[t]
        if t in self.qm.constants:
            return relax.const(np.ascontiguousarray(self.qm.constants[t]))
        raise KeyError(f"tensor {t!r} is used before it is computed")

    def emit(self, family: str, node: QNode, fn, *args, **kw) -> relax.Expr:
        hint = f"{family}_{_name(node.name)}"
        if hint in self.kernels:  # names truncated to 48 characters may collide
            hint = f"{hint}_{len(self.kernels)}"
        self.kernels[hint] = family
        self.last_hint = hint
        return self.bb.emit_te(fn, *args, primfunc_name_hint=hint, **kw)

    def weight(self, node: QNode) -> tuple[np.ndarray, relax.Expr, int]:
        """(int8 weight, the constant to pass, bits)."""
        w = np.asarray(self.qm.constants[node.params["weight"]]).astype(np.int8)
        bits = int(node.attrs.get("weight_bits", 8))
        if bits == 4:
            packed = kint4.pack_int4(w)
            self.weight_bytes += packed.nbytes
            return w, relax.const(packed), 4
        self.weight_bytes += w.nbytes
        return w, relax.const(np.ascontiguousarray(w)), 8

    def rescale_np(self, node: QNode, o: int) -> tuple[np.ndarray, np.ndarray]:
        m = _vec(self.qm.constants[node.params["multiplier"]], o)
        s = _vec(self.qm.constants[node.params["shift"]], o)
        return m, s

    def rescale(self, node: QNode, o: int) -> tuple[relax.Expr, relax.Expr]:
        m, s = self.rescale_np(node, o)
        return relax.const(m), relax.const(s)

    def add_params(self, node: QNode) -> dict[str, int]:
        a = node.attrs
        ia, ib = node.inputs
        p = {k: int(a[k]) for k in kew.ADD_PARAMS}
        p.update(
            za=self.zp(ia),
            zb=self.zp(ib),
            zout=self.zp(node.outputs[0]),
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )
        return p

    def residual(self, add: QNode | None):
        """For a conv fused with the residual ``add`` (``fusion.residual_fusions``): (the extra kernel
        arguments [the add's other operand], a function of those TE tensors giving the epilogue's ``then``
        step, the node the kernel is named after, the family suffix). Without ``add``: no change."""
        if add is None:
            return [], lambda *rest: None, None, ""
        _, k = self.fusions[add.name]
        params = self.add_params(add)
        narrow = kew.add_narrow_ok(**params)

        def make_then(ot):
            def then(y, idx):
                v = ot[idx]
                va, vb = (y, v) if k == 0 else (v, y)
                return kew.add_value(va, vb, narrow=narrow, **params)

            return then

        return [self.val(add.inputs[1 - k])], make_then, add, FUSED_SUFFIX

    # ---- operators ----------------------------------------------------------------
    def conv2d(self, node: QNode, add: QNode | None = None) -> relax.Expr:
        """A conv2d node; with ``add`` the residual add it feeds is computed in its epilogue (one kernel
        named after the add, producing the add's output)."""
        a = node.attrs
        x = self.val(node.inputs[0])
        w, wc, bits = self.weight(node)
        o, kh, kw, ipg = w.shape
        c = int(x.ty.shape[3])
        zin, zout = self.zp(node.inputs[0]), self.zp(node.outputs[0])
        bias = kconv.fold_input_zero_point(np.asarray(self.qm.constants[node.params["bias"]]), w, zin)
        m, s = self.rescale(node, o)
        g = int(a.get("groups", 1))
        common = dict(
            strides=a.get("strides", (1, 1)),
            dilations=a.get("dilations", (1, 1)),
            pads=a.get("pads", (0, 0, 0, 0)),
            zin=zin,
            zout=zout,
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )
        depthwise = g > 1 and ipg == 1 and g == c
        if g == 1 and self.intrin is not None:
            return self.conv2d_dot(node, x, w, bits, m, s, common, add)
        if depthwise:
            return self.depthwise(node, x, w, bits, bias, m, s, common)
        extra, make_then, named, suffix = self.residual(add)

        def fn(xt, wt, bt, mt, st, *rest):
            if bits == 4:
                wt = kint4.unpack_int4_te(wt, (o, kh, kw, ipg))
            return kconv.conv2d_nhwc(xt, wt, bt, mt, st, groups=g, then=make_then(*rest), **common)

        family = "conv2d" + ("_int4" if bits == 4 else "") + suffix
        return self.emit(family, named or node, fn, x, wc, relax.const(bias), m, s, *extra)

    def depthwise(self, node: QNode, x, w: np.ndarray, bits: int, bias: np.ndarray, m, s, common: dict):
        """Depthwise conv over weights transposed to [KH, KW, O] (channels vectorize); int4 stays packed."""
        o, kh, kw, _ = w.shape
        wt = kdw.pack_weight_hwo(w)
        wc = kint4.pack_int4(wt) if bits == 4 else wt
        narrow = kreq.narrow_mode(w, bias, *self.rescale_np(node, o), act_span=128)

        def fn(xt, wt_, bt, mt, st):
            if bits == 4:
                wt_ = kint4.unpack_int4_te(wt_, (kh, kw, o))
            return kdw.depthwise_conv2d_hwo(xt, wt_, bt, mt, st, narrow=narrow, **common)

        return self.emit(
            "depthwise" + ("_int4" if bits == 4 else ""), node, fn, x, relax.const(wc), relax.const(bias), m, s
        )

    def conv2d_dot(self, node: QNode, x, w: np.ndarray, bits: int, m, s, common: dict, add=None) -> relax.Expr:
        """groups == 1 conv over weights packed for the target's dot-product intrinsic (int4 weights
        stay packed two per byte in the blocked layout and are unpacked in the kernel)."""
        act, nb, kb = ktz.LAYOUTS[self.intrin]
        wp = kconv.pack_weight_dot(w, nb, kb)
        zin = common["zin"]
        bias = kconv.fold_input_zero_point_dot(
            np.asarray(self.qm.constants[node.params["bias"]]), w, zin, act == "uint8"
        )
        if bits == 4:
            wc = kint4.pack_int4_tiles(wp)
            self.weight_bytes += wc.nbytes - kint4.packed_nbytes(w.shape)
        else:
            wc = wp
            self.weight_bytes += wp.nbytes - w.nbytes  # the packed (padded) layout is what is stored
        o = w.shape[0]
        narrow = kreq.narrow_mode(w, bias, *self.rescale_np(node, o), act_span=255 if act == "uint8" else 128)
        extra, make_then, named, suffix = self.residual(add)

        def fn(xt, wt, bt, mt, st, *rest):
            if bits == 4:
                wt = kint4.unpack_int4_tiles_te(wt, wp.shape)
            return kconv.conv2d_dot(
                xt, wt, bt, mt, st, out_channels=o, act_dtype=act, narrow=narrow, then=make_then(*rest), **common
            )

        family = f"conv2d_{self.intrin}" + ("_int4" if bits == 4 else "") + suffix
        y = self.emit(family, named or node, fn, x, relax.const(wc), relax.const(bias), m, s, *extra)
        self.scheduled[self.last_hint] = ("conv", self.intrin)
        return y

    def dense(self, node: QNode) -> relax.Expr:
        a = node.attrs
        x = self.val(node.inputs[0])
        w, wc, bits = self.weight(node)
        o, k = w.shape
        shape = [int(d) for d in x.ty.shape]
        if len(shape) != 2:
            x = self.bb.emit(relax.op.reshape(x, (-1, k)))
        zin, zout = self.zp(node.inputs[0]), self.zp(node.outputs[0])
        bias = kconv.fold_input_zero_point(np.asarray(self.qm.constants[node.params["bias"]]), w, zin)
        m, s = self.rescale(node, o)
        kw = dict(zout=zout, act_min=int(a.get("act_min", -128)), act_max=int(a.get("act_max", 127)))

        if self.intrin is not None and bits == 8:
            act, nb, kb = ktz.LAYOUTS[self.intrin]
            wp = ktz.pack_weight(w, nb, kb)
            self.weight_bytes += wp.nbytes - w.nbytes  # the packed (padded) layout is what is stored
            bias_t = ktz.fold_zero_point(np.asarray(self.qm.constants[node.params["bias"]]), w, zin, act == "uint8")

            def fnt(xt, wt, bt, mt, st):
                return ktz.dense_tensorized(xt, wt, bt, mt, st, out_features=o, act_dtype=act, **kw)

            y = self.emit("dense_" + self.intrin, node, fnt, x, relax.const(wp), relax.const(bias_t), m, s)
            self.scheduled[self.last_hint] = ("gemm", self.intrin)
        else:

            def fn(xt, wt, bt, mt, st):
                if bits == 4:
                    wt = kint4.unpack_int4_te(wt, (o, k))
                return kdense.dense(xt, wt, bt, mt, st, **kw)

            y = self.emit("dense" + ("_int4" if bits == 4 else ""), node, fn, x, wc, relax.const(bias), m, s)
        if len(shape) != 2:
            y = self.bb.emit(relax.op.reshape(y, shape[:-1] + [o]))
        return y

    def add(self, node: QNode) -> relax.Expr:
        if node.name in self.fusions:
            return self.conv2d(self.nodes[self.fusions[node.name][0]], add=node)
        ia, ib = node.inputs
        return self.emit("add", node, kew.add, self.val(ia), self.val(ib), **self.add_params(node))

    def mul(self, node: QNode) -> relax.Expr:
        a = node.attrs
        ia, ib = node.inputs
        return self.emit(
            "mul",
            node,
            kew.mul,
            self.val(ia),
            self.val(ib),
            za=self.zp(ia),
            zb=self.zp(ib),
            zout=self.zp(node.outputs[0]),
            multiplier=int(a["multiplier"]),
            shift=int(a["shift"]),
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )

    def requantize(self, node: QNode) -> relax.Expr:
        a = node.attrs
        m = np.atleast_1d(np.asarray(a["multiplier"])).astype(np.int32)
        s = np.atleast_1d(np.asarray(a["shift"])).astype(np.int32)
        return self.emit(
            "requantize",
            node,
            kreq.requantize_op,
            self.val(node.inputs[0]),
            relax.const(m),
            relax.const(s),
            zin=self.zp(node.inputs[0]),
            zout=self.zp(node.outputs[0]),
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )

    def maxpool(self, node: QNode) -> relax.Expr:
        a = node.attrs
        return self.emit(
            "pool",
            node,
            kpool.maxpool,
            self.val(node.inputs[0]),
            kernel=a["kernel"],
            strides=a["strides"],
            pads=a.get("pads", (0, 0, 0, 0)),
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )

    def avgpool(self, node: QNode) -> relax.Expr:
        a = node.attrs
        x = self.val(node.inputs[0])
        _, h, w, _ = (int(d) for d in x.ty.shape)
        pads = a.get("pads", (0, 0, 0, 0))
        half, mb, mk = kpool.avgpool_tables(h, w, a["kernel"], a["strides"], pads)
        return self.emit(
            "pool",
            node,
            kpool.avgpool,
            x,
            relax.const(half),
            relax.const(mb),
            relax.const(mk),
            kernel=a["kernel"],
            strides=a["strides"],
            pads=pads,
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )

    def concat(self, node: QNode) -> relax.Expr:
        a = node.attrs
        rescales = [None if m is None else (int(m), int(s)) for m, s in zip(a["multipliers"], a["shifts"], strict=True)]
        zins = [self.zp(i) for i in node.inputs]
        xs = [self.val(i) for i in node.inputs]

        def fn(*ts):
            return klayout.concat(*ts, axis=int(a["axis"]), rescales=rescales, zins=zins, zout=self.zp(node.outputs[0]))

        return self.emit("concat", node, fn, *xs)

    def pad(self, node: QNode) -> relax.Expr:
        return self.emit(
            "pad", node, klayout.pad, self.val(node.inputs[0]), pads=node.attrs["pads"], fill=self.zp(node.outputs[0])
        )

    def reshape(self, node: QNode) -> relax.Expr:
        x = self.val(node.inputs[0])
        shape = [self.batch if d is None else int(d) for d in node.attrs["shape"]]
        return self.bb.emit(relax.op.reshape(x, shape))

    def transpose(self, node: QNode) -> relax.Expr:
        return self.emit("transpose", node, klayout.transpose, self.val(node.inputs[0]), perm=node.attrs["perm"])

    def lut(self, node: QNode) -> relax.Expr:
        table = np.asarray(self.qm.constants[node.params["table"]]).astype(np.int8)
        return self.emit("lut", node, kew.lut, self.val(node.inputs[0]), relax.const(table))

    def clamp(self, node: QNode) -> relax.Expr:
        a = node.attrs
        return self.emit(
            "clamp",
            node,
            kew.clamp,
            self.val(node.inputs[0]),
            act_min=int(a.get("act_min", -128)),
            act_max=int(a.get("act_max", 127)),
        )

    # ---- the graph ----------------------------------------------------------------
    def run(self) -> Lowered:
        qm = self.qm
        params, in_infos = [], []
        feeds: dict[str, str] = {}  # graph input -> int8 tensor it becomes
        for name in qm.inputs:
            q = next((n for n in qm.nodes if n.op == "quantize" and n.inputs[0] == name), None)
            tname = q.outputs[0] if q else name
            info = qm.tensors[tname]
            if info.dtype != "int8":
                raise UnsupportedOpsError([(f"{info.dtype} graph input", name)], context="edgekit compile (TVM)")
            shape = [self.batch if d is None else int(d) for d in info.shape]
            v = relax.Var(_name(name), relax.TensorType(shape, "int8"))
            params.append(v)
            self.env[tname] = v
            feeds[name] = tname
            in_infos.append(
                {"name": name, "shape": shape, "dtype": "int8", "scale": info.scale, "zero_point": info.zero_point}
            )
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in qm.nodes:
                    if node.op == "quantize" or node.name in self.fused_convs:
                        continue  # a fused conv is emitted with its residual add
                    self.env[node.outputs[0]] = getattr(self, node.op)(node)
                outs = [self.env[o.name] for o in qm.outputs]
                res = self.bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
            self.bb.emit_func_output(res)
        out_infos = []
        for o in qm.outputs:
            info = qm.tensors[o.name]
            shape = [int(d) for d in self.env[o.name].ty.shape]
            out_infos.append(
                {
                    "name": o.name,
                    "shape": shape,
                    "dtype": "int8",
                    "scale": info.scale,
                    "zero_point": info.zero_point,
                    "epilogue": list(o.epilogue),
                }
            )
        raw = self.bb.get()
        for gv in list(raw.functions.keys()):
            f = raw[gv]
            if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in self.kernels:
                kind, intrin = self.scheduled.get(gv.name_hint, (kspace.kind_of(self.kernels[gv.name_hint]), None))
                raw[gv] = kspace.tag(f, kind, intrin)
        mod = tvm.IRModule(dict(raw.functions), attrs=raw.attrs)
        for gv, f in raw.functions.items():
            if isinstance(f, tvm.tirx.PrimFunc):
                mod[gv] = kspace.schedule_default(f, self.threads)
        return Lowered(mod, in_infos, out_infos, self.weight_bytes, self.kernels, unscheduled=raw)


def lower(qm: QuantModel, batch: int = 1, target=None, tensorize: bool = True) -> Lowered:
    """The Relax module for ``qm`` at a static batch size. With a TVM ``target`` whose CPU has a
    dot-product instruction (VNNI, sdot, NEON), int8 dense layers use the tensorized kernels over
    pre-packed weights."""
    check_supported(qm)
    intrin = ktz.intrin_for(target) if (target is not None and tensorize) else None
    return _Lowerer(qm, batch, intrin).run()
