"""The quantization graph of a Llama, simulated in float (fake quantization), in numpy or torch.

One forward (``sim_forward``) serves three purposes: calibration (observe activation ranges and per-channel
maxima, no quantization), evaluation of a quantization setting without building integers, and the
end-to-end learning step of MobileQuant (torch, with straight-through rounding). It mirrors
``edgekit.llm.qlm.int_forward`` tensor for tensor: same quantization points, same folding.

The equivalent transformation (per layer):

- norm -> q/k/v and norm -> gate/up: per-channel scale ``s`` and shift ``d``: the norm computes
  ``(rms(x) * g - d) / s`` (its weight and a bias), the linears take ``W * s`` and a bias ``W @ d``;
- v -> o: v's output rows ``(W_v, b_v - d) / s``; since softmax rows sum to one, attention output is
  ``(attn - d) / s`` per kv channel (repeated over the query heads of its group), and o takes ``W_o * s``
  and a bias ``W_o @ d``;
- up -> down: up's rows ``/ s``, down's columns ``* s`` (SiLU(gate) * up is linear in up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.llm.model import LlamaModel
from edgekit.llm.qlm import DEFAULT_ACT16

PAIRS = ("attn", "mlp", "v", "h")  # smoothing pairs: norm->qkv, norm->gate/up, v->o, up->down


@dataclass
class Scheme:
    """What to quantize and how wide: weight bits (8 or 4), activation bits, tensors kept at 16 bits."""

    weight_bits: int = 8
    act_bits: int = 8
    act16: tuple[str, ...] = DEFAULT_ACT16
    embed_bits: int = 8  # tied embedding / lm_head stays 8-bit in W4A8
    # > 0 (with weight_bits 4): progressive group-wise int4 (``group_grid``): int8 per output channel, then
    # groups of ``group_size`` input channels as uint4 with an integer scale and zero point
    group_size: int = 0

    def bits(self, name: str) -> int:
        return 16 if name in self.act16 else self.act_bits


@dataclass
class QParams:
    """Everything that decides a quantized model besides the float weights (numpy arrays or torch tensors):
    per-layer smoothing ``s_<pair>`` and shifts ``d_<pair>``, per-linear clipping ratios ``clip_<lin>``
    ([out] in (0, 1]), per-layer and global activation ranges ``(lo, hi)``."""

    layers: list[dict[str, Any]]
    ranges: list[dict[str, tuple[Any, Any]]] = field(default_factory=list)
    granges: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def identity_qparams(model: LlamaModel) -> QParams:
    c = model.config
    kv = c.kv_heads * c.head_dim
    layers = []
    for lw in model.layers:
        d: dict[str, Any] = {}
        for p, n in (("attn", c.hidden), ("mlp", c.hidden), ("v", kv), ("h", c.intermediate)):
            d["s_" + p] = np.ones(n, np.float32)
            d["d_" + p] = np.zeros(n, np.float32)
        for k in ("q", "k", "v", "o", "gate", "up", "down"):
            d["clip_" + k] = np.ones(lw[k].shape[0], np.float32)
        layers.append(d)
    return QParams(layers)


# ---- backends -------------------------------------------------------------------------------------------


class NpOps:
    """numpy backend."""

    @staticmethod
    def asarray(x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    round = staticmethod(np.round)
    exp = staticmethod(np.exp)
    floor = staticmethod(np.floor)
    ceil = staticmethod(np.ceil)

    @staticmethod
    def stop(x: Any) -> Any:
        return x

    @staticmethod
    def gmin(x: Any) -> Any:
        return np.min(x, axis=-1)

    @staticmethod
    def gmax(x: Any) -> Any:
        return np.max(x, axis=-1)

    @staticmethod
    def clamp(x: Any, lo: Any, hi: Any) -> Any:
        return np.minimum(np.maximum(x, lo), hi)

    @staticmethod
    def amax(x: Any, axis: int) -> Any:
        return np.max(np.abs(x), axis=axis)

    @staticmethod
    def softmax(x: Any) -> Any:
        m = np.max(x, axis=-1, keepdims=True)
        e = np.exp(x - m)
        return e / np.sum(e, axis=-1, keepdims=True)

    @staticmethod
    def cat(xs: list[Any], axis: int) -> Any:
        return np.concatenate(xs, axis=axis)

    @staticmethod
    def np(x: Any) -> np.ndarray:
        return np.asarray(x)


class TorchOps:
    """torch backend, with straight-through rounding."""

    def __init__(self) -> None:
        import torch

        self.t = torch

    def asarray(self, x: Any) -> Any:
        return x if isinstance(x, self.t.Tensor) else self.t.as_tensor(np.array(x, np.float32))

    def round(self, x: Any) -> Any:
        return x + (self.t.round(x) - x).detach()

    def exp(self, x: Any) -> Any:
        return self.t.exp(x)

    def floor(self, x: Any) -> Any:
        return self.t.floor(x)

    def ceil(self, x: Any) -> Any:
        return self.t.ceil(x)

    def stop(self, x: Any) -> Any:
        return x.detach()

    def gmin(self, x: Any) -> Any:
        return self.t.amin(x, dim=-1)

    def gmax(self, x: Any) -> Any:
        return self.t.amax(x, dim=-1)

    def clamp(self, x: Any, lo: Any, hi: Any) -> Any:
        return self.t.minimum(self.t.maximum(self.asarray(x), self.asarray(lo)), self.asarray(hi))

    def amax(self, x: Any, axis: int) -> Any:
        return self.t.amax(self.t.abs(x), dim=axis)

    def softmax(self, x: Any) -> Any:
        return self.t.softmax(x, dim=-1)

    def cat(self, xs: list[Any], axis: int) -> Any:
        return self.t.cat(xs, dim=axis)

    def np(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, self.t.Tensor) else np.asarray(x)

    def recompute(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` without keeping its intermediates for backward (recomputed there): the weight fake
        quantizers' temporaries are a few copies of every weight matrix."""
        if not self.t.is_grad_enabled() or not any(isinstance(a, self.t.Tensor) and a.requires_grad for a in args):
            return fn(*args)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)


def torch_model(model: LlamaModel) -> LlamaModel:
    """The same model with torch float32 tensors (converted once, for the torch backend)."""
    import torch

    def T(a: Any) -> Any:
        return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.array(a, np.float32))

    return LlamaModel(
        model.config,
        T(model.embed),
        T(model.norm),
        [{k: T(v) for k, v in lw.items()} for lw in model.layers],
        None if model.lm_head is None else T(model.lm_head),
        model.tokenizer,
        model.meta,
    )


# ---- folding --------------------------------------------------------------------------------------------


def kv_index(cfg: Any) -> np.ndarray:
    """For each channel of the attention output (o's input), its kv channel."""
    grp = cfg.heads // cfg.kv_heads
    heads = np.arange(cfg.heads) // grp
    return (heads[:, None] * cfg.head_dim + np.arange(cfg.head_dim)[None, :]).reshape(-1)


def fold_layer(ops: Any, lw: dict[str, Any], p: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Float weights and biases of one layer after the equivalent transformation ``p``."""
    A = ops.asarray
    sa, da, sm, dm, sv, dv, sh = (A(p[k]) for k in ("s_attn", "d_attn", "s_mlp", "d_mlp", "s_v", "d_v", "s_h"))
    idx = kv_index(cfg)
    out: dict[str, Any] = {}
    out["attn_norm"] = A(lw["attn_norm"]) / sa
    out["attn_norm_bias"] = -da / sa
    for k in ("q", "k"):
        out[k] = A(lw[k]) * sa[None, :]
        out[k + "_b"] = A(lw[k]) @ da
    wv = A(lw["v"])
    out["v"] = (wv * sa[None, :]) / sv[:, None]
    out["v_b"] = (wv @ da - dv) / sv
    svr, dvr = sv[idx], dv[idx]
    wo = A(lw["o"])
    out["o"] = wo * svr[None, :]
    out["o_b"] = wo @ dvr
    out["mlp_norm"] = A(lw["mlp_norm"]) / sm
    out["mlp_norm_bias"] = -dm / sm
    wg, wu = A(lw["gate"]), A(lw["up"])
    out["gate"] = wg * sm[None, :]
    out["gate_b"] = wg @ dm
    out["up"] = (wu * sm[None, :]) / sh[:, None]
    out["up_b"] = (wu @ dm) / sh
    out["down"] = A(lw["down"]) * sh[None, :]
    out["down_b"] = A(np.zeros(lw["down"].shape[0], np.float32))
    return out


def weight_scale(ops: Any, w: Any, clip: Any, bits: int) -> Any:
    """Per-output-channel symmetric scale: clip * max|w| / (2**(bits-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    return ops.clamp(ops.amax(w, 1) * ops.asarray(clip), 1e-8, 1e30) / qmax


# Progressive group quantization (QServe, Lin et al. 2024). Level 1: per-output-channel int8 with a protective
# range [-P8, P8]. Level 2: each group of ``group`` input channels on a uint4 grid whose step is an integer number
# of int8 steps: expanded = (q4 - z) * sg, sg in 1..16, z in 0..15. Rounding moves a value by at most sg/2 <= 8,
# so every expanded weight fits [-120, 120]: the matmul stays int8 x int8 -> int32, followed by the unchanged
# per-channel dyadic rescale by s1. The float weight is rounded once, straight onto the final grid (no double
# rounding through int8). P8 = 112 = 16 * 7: the channel maximum (exactly P8 in int8 units) is never a rounding tie
# P8 / sg = k + 1/2 for any sg <= 16 (with 119, sg 2 and 14 tie), so the float32 simulation and the float64
# integer build agree on it.
P8 = 112


def group_grid(ops: Any, w: Any, clip: Any, group: int) -> tuple[Any, Any, Any, Any, Any]:
    """(s1 [out], sg [out, G], z [out, G], q_lo, q_hi) of the progressive int4 grid of ``w`` [out, in].

    sg and z are integers (held as floats; constants in the learning step: no gradient through them); q_lo/q_hi
    bound q4 so that |(q4 - z) * sg| <= 127 even for clipped values."""
    o, n = w.shape
    if n % group:
        raise ValueError(f"group size {group} does not divide the input width {n}")
    s1 = ops.clamp(ops.amax(w, 1) * ops.asarray(clip), 1e-8, 1e30) / P8
    u = ops.stop(ops.clamp(w / s1[:, None], -P8, P8)).reshape(o, n // group, group)
    lo, hi = ops.clamp(ops.gmin(u), -1e30, 0.0), ops.clamp(ops.gmax(u), 0.0, 1e30)  # the grid holds 0
    sg = ops.clamp(ops.ceil((hi - lo) / 15.0), 1.0, 16.0)
    z = ops.clamp(ops.stop(ops.round(-lo / sg)), 0.0, 15.0)
    reach = ops.floor(127.0 / sg)
    return s1, sg, z, ops.clamp(z - reach, 0.0, 15.0), ops.clamp(z + reach, 0.0, 15.0)


def fake_quant_weight_group(ops: Any, w: Any, clip: Any, group: int) -> Any:
    o, n = w.shape
    s1, sg, z, qlo, qhi = group_grid(ops, w, clip, group)
    u = (w / s1[:, None]).reshape(o, n // group, group)
    q = ops.clamp(ops.round(u / sg[..., None]) + z[..., None], qlo[..., None], qhi[..., None])
    return ((q - z[..., None]) * sg[..., None]).reshape(o, n) * s1[:, None]


def fake_quant_weight(ops: Any, w: Any, clip: Any, bits: int, group: int = 0) -> Any:
    if group and bits == 4:
        return fake_quant_weight_group(ops, w, clip, group)
    qmax = 2 ** (bits - 1) - 1
    s = weight_scale(ops, w, clip, bits)[:, None]
    return ops.clamp(ops.round(w / s), -qmax, qmax) * s


def fake_quant_act(ops: Any, x: Any, lo: Any, hi: Any, bits: int) -> Any:
    """Affine fake quantization over [min(lo, 0), max(hi, 0)], integer zero point (as ``ActQ.from_range``)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = ops.clamp(lo, -1e30, 0.0)
    hi = ops.clamp(hi, 0.0, 1e30)
    s = ops.clamp(hi - lo, 1e-8, 1e30) / (qmax - qmin)
    z = ops.clamp(ops.round(qmin - lo / s), qmin, qmax)
    return (ops.clamp(ops.round(x / s) + z, qmin, qmax) - z) * s


LINEAR_INPUTS = ("attn_in", "attn_out", "mlp_in", "h")  # the (quantized) inputs of q/k/v, o, gate/up, down


class Observer:
    """Per-tensor min/max of every quantization point, and per-channel |max| of the smoothing pairs' inputs;
    with ``hessians`` also sum(x^T x) of every linear's quantized input (for GPTQ)."""

    def __init__(self, hessians: bool = False) -> None:
        self.minmax: dict[str, tuple[float, float]] = {}
        self.chmax: dict[str, np.ndarray] = {}
        self.hessians: dict[str, np.ndarray] | None = {} if hessians else None

    def see_input(self, key: str, x: np.ndarray) -> None:
        x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        h = x2.T @ x2
        self.hessians[key] = self.hessians[key] + h if key in self.hessians else h

    def see(self, key: str, x: np.ndarray) -> None:
        lo, hi = float(x.min()), float(x.max())
        if key in self.minmax:
            a, b = self.minmax[key]
            lo, hi = min(lo, a), max(hi, b)
        self.minmax[key] = (lo, hi)

    def see_channels(self, key: str, x: np.ndarray) -> None:
        m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        self.chmax[key] = np.maximum(self.chmax.get(key, m), m)


def sim_forward(
    model: LlamaModel,
    qp: QParams | None,
    scheme: Scheme,
    ids: Any,
    *,
    ops: Any = None,
    quant: bool = True,
    observer: Observer | None = None,
    logits: bool = False,
    weights: dict[str, Any] | None = None,
) -> Any:
    """Final normed hidden states [B, T, H] (or logits) of the (fake-)quantized model on ids [B, T].

    ``qp`` None means no transformation (float model, or RTN); ``quant`` False turns every quantizer off
    (weights too); ``observer`` records ranges of the (transformed) tensors.
    """
    ops = ops or NpOps()
    c = model.config
    ids_np = np.asarray(ops.np(ids), dtype=np.int64)
    if ids_np.ndim == 1:
        ids_np = ids_np[None]
    b, t = ids_np.shape
    qp = qp or identity_qparams(model)
    quant_w = quant
    quant_a = quant and bool(qp.ranges)

    def act(x: Any, name: str, layer: int | None) -> Any:
        key = name if layer is None else f"{layer}.{name}"
        if observer is not None:
            observer.see(key, ops.np(x))
        if not quant_a:
            return x
        lo, hi = qp.granges[name] if layer is None else qp.ranges[layer][name]
        y = fake_quant_act(ops, x, lo, hi, scheme.bits(name))
        if observer is not None and observer.hessians is not None and name in LINEAR_INPUTS:
            observer.see_input(key, ops.np(y))
        return y

    def lin(x: Any, w: Any, bias: Any, clip: Any) -> Any:
        if not quant_w:
            return x @ w.T + bias
        if hasattr(ops, "recompute"):
            wq = ops.recompute(
                lambda w_, c_: fake_quant_weight(ops, w_, c_, scheme.weight_bits, scheme.group_size),
                w,
                ops.asarray(clip),
            )
        else:
            wq = fake_quant_weight(ops, w, clip, scheme.weight_bits, scheme.group_size)
        return x @ wq.T + bias

    def rms(x: Any, w: Any, bias: Any) -> Any:
        return x / ((x * x).mean(-1, keepdims=True) + c.rms_eps) ** 0.5 * w + bias

    emb = ops.asarray(model.embed if weights is None else weights["embed"])
    ones = np.ones(emb.shape[0], np.float32)
    emb_q = fake_quant_weight(ops, emb, ones, scheme.embed_bits) if quant_w else emb
    x = act(emb_q[ids_np], "embed", None)
    from edgekit.llm.model import rope_tables

    cos, sin = (ops.asarray(a) for a in rope_tables(c.head_dim, np.arange(t), c.rope_theta))
    mask = ops.asarray(np.triu(np.full((t, t), -1e9, np.float32), 1))
    grp = c.heads // c.kv_heads
    hd = c.head_dim

    def rope(z: Any) -> Any:
        rot = ops.cat([-z[..., hd // 2 :], z[..., : hd // 2]], -1)
        return z * cos + rot * sin

    def heads(z: Any, n: int) -> Any:
        return (
            z.reshape(b, t, n, hd).transpose(1, 2)
            if not isinstance(z, np.ndarray)
            else z.reshape(b, t, n, hd).transpose(0, 2, 1, 3)
        )

    def tr(z: Any) -> Any:  # swap the last two axes
        return z.transpose(-1, -2) if not isinstance(z, np.ndarray) else np.swapaxes(z, -1, -2)

    for i, lw in enumerate(model.layers):
        p = qp.layers[i]
        f = fold_layer(ops, lw, p, c)
        hn = rms(x, f["attn_norm"], f["attn_norm_bias"])
        if observer is not None:
            observer.see_channels(f"{i}.attn_x", ops.np(hn))
        h = act(hn, "attn_in", i)
        q = heads(lin(h, f["q"], f["q_b"], p["clip_q"]), c.heads)
        k = heads(lin(h, f["k"], f["k_b"], p["clip_k"]), c.kv_heads)
        q = act(rope(q), "q", i)
        k = act(rope(k), "k", i)
        v = act(lin(h, f["v"], f["v_b"], p["clip_v"]), "v", i)
        v = heads(v, c.kv_heads)
        if grp > 1:
            k = ops.cat([k[:, j // grp : j // grp + 1] for j in range(c.heads)], 1)
            v = ops.cat([v[:, j // grp : j // grp + 1] for j in range(c.heads)], 1)
        pr = act(ops.softmax(q @ tr(k) / float(np.sqrt(hd)) + mask), "probs", i)
        a = pr @ v
        a = (
            a.transpose(1, 2).reshape(b, t, c.hidden)
            if not isinstance(a, np.ndarray)
            else a.transpose(0, 2, 1, 3).reshape(b, t, c.hidden)
        )
        if observer is not None:
            observer.see_channels(f"{i}.o_x", ops.np(a))
        a = act(a, "attn_out", i)
        o = act(lin(a, f["o"], f["o_b"], p["clip_o"]), "o_out", i)
        x = act(x + o, "res_mid", i)
        hn = rms(x, f["mlp_norm"], f["mlp_norm_bias"])
        if observer is not None:
            observer.see_channels(f"{i}.mlp_x", ops.np(hn))
        h = act(hn, "mlp_in", i)
        g = act(lin(h, f["gate"], f["gate_b"], p["clip_gate"]), "gate", i)
        u = act(lin(h, f["up"], f["up_b"], p["clip_up"]), "up", i)
        sl = act(g / (1.0 + ops.exp(-g)), "silu", i)
        hh = sl * u
        if observer is not None:
            observer.see_channels(f"{i}.down_x", ops.np(hh))
        hh = act(hh, "h", i)
        d = act(lin(hh, f["down"], f["down_b"], p["clip_down"]), "down_out", i)
        x = act(x + d, "res_out", i)
    out = act(rms(x, ops.asarray(model.norm), 0.0), "final_in", None)
    if not logits:
        return out
    head = ops.asarray(model.head)
    hq = fake_quant_weight(ops, head, np.ones(head.shape[0], np.float32), scheme.embed_bits) if quant_w else head
    return out @ hq.T
