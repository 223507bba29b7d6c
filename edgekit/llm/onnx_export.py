"""Export a ``QuantLM`` to ONNX in QDQ form: int8/int4 weights with per-channel DequantizeLinear, int32
biases, and a QuantizeLinear -> DequantizeLinear pair with the static per-tensor scale and zero point
(int8, or int16 where chosen) at every activation the integer executor quantizes.

The graph is the full-sequence (prefill) forward: ``input_ids`` int64 [1, T] -> ``logits`` float [1, T, V],
T up to ``max_len``. The opset is 21 (int16 and int4 QDQ). Float ops between DQ and Q: RMSNorm, RoPE,
softmax, SiLU (a QDQ runtime may fuse them; the integer executor uses a table for SiLU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.llm.model import rope_tables
from edgekit.llm.qlm import ActQ, QLinear, QuantLM


def export_onnx(qm: QuantLM, path: str | Path, max_len: int = 512, group_int4: str = "expand") -> Path:
    """Write ``qm`` as an ONNX QDQ model; returns the path.

    Group-wise int4 linears: ``group_int4="expand"`` (default) writes their exact int8 expansion with the
    per-channel scale (the integer executor's matmul operand; what int8 NPU execution providers take);
    ``"blocked"`` writes the uint4 codes with a blocked DequantizeLinear (block_size = group, scale
    s_channel * s_group, uint4 zero points), half the bytes, for runtimes with int4 support."""
    if group_int4 not in ("expand", "blocked"):
        raise ValueError(f"group_int4 must be 'expand' or 'blocked', not {group_int4!r}")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = qm.config
    nodes: list[Any] = []
    inits: list[Any] = []
    counter = [0]

    def uid(p: str) -> str:
        counter[0] += 1
        return f"{p}_{counter[0]}"

    def const(a: np.ndarray, name: str | None = None) -> str:
        n = name or uid("c")
        inits.append(numpy_helper.from_array(np.asarray(a), n))
        return n

    def node(op: str, ins: list[str], **attrs: Any) -> str:
        out = uid(op.lower())
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def qdq(x: str, aq: ActQ) -> str:
        dt = np.int8 if aq.bits == 8 else np.int16
        s = const(np.array(aq.scale, np.float32))
        z = const(np.array(aq.zero_point, dt))
        return node("DequantizeLinear", [node("QuantizeLinear", [x, s, z]), s, z])

    def wdq(w: QLinear) -> str:
        if w.grouped and group_int4 == "blocked":
            g = w.group_size
            q = helper.make_tensor(uid("w4"), TensorProto.UINT4, list(w.q4.T.shape), w.q4.T.reshape(-1).tolist())
            z = helper.make_tensor(
                uid("z4"), TensorProto.UINT4, list(w.g_zero.T.shape), w.g_zero.T.reshape(-1).tolist()
            )
            inits.extend([q, z])
            sc = (w.w_scale.astype(np.float64)[None, :] * w.g_scale.T.astype(np.float64)).astype(np.float32)
            return node("DequantizeLinear", [q.name, const(np.ascontiguousarray(sc)), z.name], axis=0, block_size=g)
        if w.bits == 4:
            wi = helper.make_tensor(
                uid("w4"), TensorProto.INT4, list(w.weight.T.shape), w.weight.T.astype(np.int8).reshape(-1).tolist()
            )
            inits.append(wi)
            wn = wi.name
            z = helper.make_tensor(uid("z4"), TensorProto.INT4, [w.weight.shape[0]], [0] * w.weight.shape[0])
            inits.append(z)
            zn = z.name
        else:
            wn = const(np.ascontiguousarray(w.weight.T.astype(np.int8)))
            zn = const(np.zeros(w.weight.shape[0], np.int8))
        return node("DequantizeLinear", [wn, const(w.w_scale.astype(np.float32)), zn], axis=1)

    def linear(x: str, xq: ActQ, w: QLinear) -> str:
        y = node("MatMul", [x, wdq(w)])
        if np.any(w.bias):
            b = node(
                "DequantizeLinear",
                [
                    const(w.bias.astype(np.int32)),
                    const((xq.scale * w.w_scale).astype(np.float32)),
                    const(np.zeros(len(w.bias), np.int32)),
                ],
                axis=0,
            )
            y = node("Add", [y, b])
        return y

    def rms(x: str, w: np.ndarray, b: np.ndarray) -> str:
        ms = node("ReduceMean", [node("Mul", [x, x]), const(np.array([-1], np.int64))], keepdims=1)
        r = node("Sqrt", [node("Add", [ms, const(np.array(c.rms_eps, np.float32))])])
        y = node("Mul", [node("Div", [x, r]), const(w.astype(np.float32))])
        return node("Add", [y, const(b.astype(np.float32))]) if np.any(b) else y

    hd, nh, nkv = c.head_dim, c.heads, c.kv_heads
    cos, sin = rope_tables(hd, np.arange(max_len), c.rope_theta)
    ids = "input_ids"
    t_len = node("Shape", [ids], start=1, end=2)  # [T]
    zero = const(np.array([0], np.int64))
    cos_t = node("Slice", [const(cos), zero, t_len])
    sin_t = node("Slice", [const(sin), zero, t_len])
    mask_full = np.triu(np.full((max_len, max_len), -1e9, np.float32), 1)
    mask = node(
        "Slice", [node("Slice", [const(mask_full), zero, t_len, zero]), zero, t_len, const(np.array([1], np.int64))]
    )
    e = qm.embed
    emb = node(
        "Gather",
        [
            node(
                "DequantizeLinear",
                [const(e.weight.astype(np.int8)), const(e.w_scale), const(np.zeros(len(e.w_scale), np.int8))],
                axis=0,
            ),
            ids,
        ],
    )  # [1, T, H]
    x = qdq(emb, qm.gacts["embed"])
    kv_rep = const(np.arange(nh) // (nh // nkv), "kv_rep")

    def split_heads(z: str, n: int) -> str:
        return node("Transpose", [node("Reshape", [z, const(np.array([1, -1, n, hd], np.int64))])], perm=[0, 2, 1, 3])

    def rope(z: str) -> str:
        half = hd // 2
        a = node(
            "Slice",
            [z, const(np.array([0], np.int64)), const(np.array([half], np.int64)), const(np.array([3], np.int64))],
        )
        b = node(
            "Slice",
            [z, const(np.array([half], np.int64)), const(np.array([hd], np.int64)), const(np.array([3], np.int64))],
        )
        rot = node("Concat", [node("Neg", [b]), a], axis=3)
        return node("Add", [node("Mul", [z, cos_t]), node("Mul", [rot, sin_t])])

    for lw, a in zip(qm.layers, qm.acts, strict=True):
        h = qdq(rms(x, lw["attn_norm"], lw["attn_norm_bias"]), a["attn_in"])
        q = qdq(rope(split_heads(linear(h, a["attn_in"], lw["q"]), nh)), a["q"])
        k = qdq(rope(split_heads(linear(h, a["attn_in"], lw["k"]), nkv)), a["k"])
        v = split_heads(qdq(linear(h, a["attn_in"], lw["v"]), a["v"]), nkv)
        k = node("Gather", [k, kv_rep], axis=1)
        v = node("Gather", [v, kv_rep], axis=1)
        s = node(
            "Mul",
            [
                node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]),
                const(np.array(1.0 / np.sqrt(hd), np.float32)),
            ],
        )
        p = qdq(node("Softmax", [node("Add", [s, mask])], axis=-1), a["probs"])
        att = node(
            "Reshape",
            [
                node("Transpose", [node("MatMul", [p, v])], perm=[0, 2, 1, 3]),
                const(np.array([1, -1, c.hidden], np.int64)),
            ],
        )
        att = qdq(att, a["attn_out"])
        o = qdq(linear(att, a["attn_out"], lw["o"]), a["o_out"])
        x = qdq(node("Add", [x, o]), a["res_mid"])
        h = qdq(rms(x, lw["mlp_norm"], lw["mlp_norm_bias"]), a["mlp_in"])
        g = qdq(linear(h, a["mlp_in"], lw["gate"]), a["gate"])
        u = qdq(linear(h, a["mlp_in"], lw["up"]), a["up"])
        sl = qdq(node("Mul", [g, node("Sigmoid", [g])]), a["silu"])
        hh = qdq(node("Mul", [sl, u]), a["h"])
        d = qdq(linear(hh, a["h"], lw["down"]), a["down_out"])
        x = qdq(node("Add", [x, d]), a["res_out"])
    f = qdq(rms(x, qm.norm, qm.norm_bias), qm.gacts["final_in"])
    logits = linear(f, qm.gacts["final_in"], qm.head)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes,
        "edgekit_lm",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, [1, "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", c.vocab_size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="edgekit.llm")
    model.ir_version = 10
    path = Path(path)
    onnx.save(model, str(path))
    return path
