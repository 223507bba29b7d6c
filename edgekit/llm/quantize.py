"""Post-training quantization of a Llama: RTN (min-max), SmoothQuant, and MobileQuant-style learning.

All three produce a ``QParams`` (smoothing, clipping, activation ranges) and then the same integer
``QuantLM`` (``build_quantlm``), so they differ only in how those numbers are chosen:

- ``rtn``: no transformation, weights rounded to nearest with max|w| per channel, activation ranges
  = min/max over the calibration tokens;
- ``smoothquant``: per-channel smoothing s = max|X|^a / max|W|^(1-a) (a = 0.5) on the four pairs
  (norm->qkv, norm->gate/up, v->o, up->down), then min-max ranges;
- ``mobilequant``: SmoothQuant as the start, then smoothing scales and shifts, weight clipping and
  activation ranges learned jointly over all layers (``edgekit.llm.learn``, torch), loss = MSE of the
  final hidden states against the float model.

Weights: per-channel symmetric int8 / int4, or (4-bit, ``Scheme.group_size`` > 0) progressive group-wise
int4 (``group_int4``; the grid is ``sim.group_grid``, the same one the learning step rounds to), rounded
to nearest or, optionally, with GPTQ (``gptq_group_int4``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgekit.errors import CalibrationError, QuantizationError
from edgekit.llm.model import LlamaModel
from edgekit.llm.qlm import GLOBAL_ACTS, LAYER_ACTS, LINEAR_INPUTS, ActQ, QLinear, QuantLM
from edgekit.llm.sim import (
    NpOps,
    Observer,
    QParams,
    Scheme,
    fold_layer,
    group_grid,
    identity_qparams,
    kv_index,
    sim_forward,
)
from edgekit.quant.arith import round_half_away

LINS = ("q", "k", "v", "o", "gate", "up", "down")


def calib_batches(ids: np.ndarray, seq_len: int, n_seqs: int) -> np.ndarray:
    """Non-overlapping [n, seq_len] windows from a token stream."""
    n = min(n_seqs, len(ids) // seq_len)
    if n < 1:
        raise CalibrationError(f"calibration text has {len(ids)} tokens; need at least {seq_len}: give more text")
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def observe(
    model: LlamaModel,
    qp: QParams | None,
    scheme: Scheme,
    batches: np.ndarray,
    *,
    quant_weights: bool,
    ops: Any = None,
    hessians: bool = False,
) -> Observer:
    """Run the calibration windows through the model (activations unquantized) and record ranges; with
    ``hessians`` (``qp`` must carry ranges) the model is fully fake-quantized and every linear's quantized input
    is recorded as sum(x^T x) for GPTQ."""
    obs = Observer(hessians=hessians)
    for row in batches:
        sim_forward(
            model,
            qp if hessians else (QParams(qp.layers) if qp else None),
            scheme,
            row[None],
            ops=ops,
            quant=quant_weights,
            observer=obs,
        )
    return obs


def minmax_ranges(model: LlamaModel, obs: Observer) -> tuple[list[dict[str, tuple[float, float]]], dict]:
    ranges = []
    for i in range(model.config.layers):
        r = {n: obs.minmax[f"{i}.{n}"] for n in LAYER_ACTS}
        r["probs"] = (0.0, 1.0)
        ranges.append(r)
    return ranges, {n: obs.minmax[n] for n in GLOBAL_ACTS}


def smoothquant_qparams(model: LlamaModel, obs: Observer, alpha: float = 0.5) -> QParams:
    """SmoothQuant scales from per-channel activation maxima (``obs`` of the untransformed float model)."""
    qp = identity_qparams(model)
    c = model.config
    idx = kv_index(c)

    def smooth(xmax: np.ndarray, wmax: np.ndarray) -> np.ndarray:
        s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-4, 1e4)
        return (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: keeps magnitudes

    for i, lw in enumerate(model.layers):
        p = qp.layers[i]
        lw = {k: np.asarray(v) for k, v in lw.items()}
        wqkv = np.abs(np.concatenate([lw["q"], lw["k"], lw["v"]], 0)).max(0)
        p["s_attn"] = smooth(obs.chmax[f"{i}.attn_x"], wqkv)
        p["s_mlp"] = smooth(obs.chmax[f"{i}.mlp_x"], np.abs(np.concatenate([lw["gate"], lw["up"]], 0)).max(0))
        kvd = c.kv_heads * c.head_dim
        ox = np.zeros(kvd, np.float32)
        np.maximum.at(ox, idx, obs.chmax[f"{i}.o_x"])
        ow = np.zeros(kvd, np.float32)
        np.maximum.at(ow, idx, np.abs(lw["o"]).max(0))
        p["s_v"] = smooth(ox, ow)
        p["s_h"] = smooth(obs.chmax[f"{i}.down_x"], np.abs(lw["down"]).max(0))
    return qp


def calibrate(
    model: LlamaModel,
    method: str,
    scheme: Scheme,
    batches: np.ndarray,
    *,
    alpha: float = 0.5,
    ops: Any = None,
    log: Any = None,
) -> QParams:
    """QParams for ``rtn`` or ``smoothquant`` (and the start of ``mobilequant``)."""
    t0 = time.time()
    if method == "rtn":
        qp = identity_qparams(model)
    elif method in ("smoothquant", "mobilequant"):
        qp = smoothquant_qparams(model, observe(model, None, scheme, batches, quant_weights=False, ops=ops), alpha)
    else:
        raise QuantizationError(f"unknown scheme {method!r}: use rtn, smoothquant or mobilequant")
    obs = observe(model, qp, scheme, batches, quant_weights=True, ops=ops)
    qp.ranges, qp.granges = minmax_ranges(model, obs)
    if log:
        log(f"calibrate {method}: {batches.size} tokens, {time.time() - t0:.1f}s")
    return qp


# ---- integer model --------------------------------------------------------------------------------------


def group_int4(w: np.ndarray, clip: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Progressive group-wise int4 of ``w`` [out, in] (``sim.group_grid``, the same grid the simulation uses):
    per-channel scale s1 (float32), uint4 codes, per-group integer scales and zero points."""
    ops = NpOps()
    w = np.asarray(w, np.float64)
    o, n = w.shape
    s1, sg, z, qlo, qhi = group_grid(ops, w, np.asarray(clip, np.float64), group)
    s1 = s1.astype(np.float32).astype(np.float64)  # the scale the executor rescales with
    u = (w / s1[:, None]).reshape(o, n // group, group)
    q = np.clip(np.round(u / sg[..., None]) + z[..., None], qlo[..., None], qhi[..., None])
    return s1.astype(np.float32), q.reshape(o, n).astype(np.uint8), sg.astype(np.uint8), z.astype(np.uint8)


def gptq_group_int4(
    w: np.ndarray, hessian: np.ndarray, clip: np.ndarray, group: int, *, damp: float = 0.01, block: int = 128
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2023) onto the progressive group-wise int4 grid: the grid (s1, sg, z) is fixed from
    the weights first ("static groups"), then columns are rounded in order, each rounding error spread over the
    columns not yet rounded through the inverse Hessian of the layer input (``hessian`` = sum x^T x of the
    quantized calibration inputs). Same outputs as ``group_int4``."""
    ops = NpOps()
    W = np.array(w, np.float64)
    o, n = W.shape
    s1, sg, z, qlo, qhi = group_grid(ops, W, np.asarray(clip, np.float64), group)
    s1 = s1.astype(np.float32).astype(np.float64)
    H = np.array(hessian, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(n)] += damp * float(np.mean(np.diag(H)))
    Hi = np.linalg.inv(H)
    U = np.linalg.cholesky((Hi + Hi.T) / 2).T  # upper Cholesky factor of H^-1
    Q = np.zeros((o, n), np.float64)
    col_g = np.arange(n) // group
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        Wb = W[:, i1:i2].copy()
        Eb = np.zeros_like(Wb)
        for j in range(i2 - i1):
            c = i1 + j
            g = col_g[c]
            q = np.clip(np.round(Wb[:, j] / s1 / sg[:, g]) + z[:, g], qlo[:, g], qhi[:, g])
            Q[:, c] = q
            err = (Wb[:, j] - (q - z[:, g]) * sg[:, g] * s1) / U[c, c]
            Wb[:, j + 1 :] -= np.outer(err, U[c, c + 1 : i2])
            Eb[:, j] = err
        W[:, i2:] -= Eb @ U[i1:i2, i2:]
    return s1.astype(np.float32), Q.astype(np.uint8), sg.astype(np.uint8), z.astype(np.uint8)


def quantize_linear(
    w: np.ndarray,
    b: np.ndarray,
    clip: np.ndarray,
    bits: int,
    in_scale: float,
    group_size: int = 0,
    hessian: np.ndarray | None = None,
) -> QLinear:
    """Symmetric per-channel integer weights (or progressive group-wise int4 when ``group_size`` and bits 4)
    and an int32 bias at scale in_scale * w_scale."""
    w = np.asarray(w, np.float64)
    if group_size and bits == 4:
        if w.shape[1] % group_size:
            raise QuantizationError(
                f"group size {group_size} does not divide a linear's input width {w.shape[1]}: "
                "choose a divisor (32 or 64 for most models)"
            )
        if hessian is not None:
            ws, q4, sg, z = gptq_group_int4(w, hessian, clip, group_size)
        else:
            ws, q4, sg, z = group_int4(w, clip, group_size)
        bi = round_half_away(np.asarray(b, np.float64) / (in_scale * ws.astype(np.float64)))
        if np.abs(bi).max(initial=0) >= 2**31:
            raise QuantizationError("a bias does not fit int32 at its scale: widen the input's activation range")
        return QLinear.from_groups(q4, sg, z, group_size, ws, bi.astype(np.int32))
    qmax = 2 ** (bits - 1) - 1
    ws = np.maximum(np.abs(w).max(1) * np.asarray(clip, np.float64), 1e-8) / qmax
    wi = np.clip(np.round(w / ws[:, None]), -qmax, qmax).astype(np.int8)
    bi = round_half_away(np.asarray(b, np.float64) / (in_scale * ws))
    if np.abs(bi).max(initial=0) >= 2**31:
        raise QuantizationError("a bias does not fit int32 at its scale: widen the input's activation range")
    return QLinear(wi, ws.astype(np.float32), bi.astype(np.int32), bits)


def build_quantlm(
    model: LlamaModel,
    qp: QParams,
    scheme: Scheme,
    meta: dict[str, Any] | None = None,
    hessians: dict[str, np.ndarray] | None = None,
) -> QuantLM:
    """Fold the transformation, quantize the weights, fix every activation's static scale. ``hessians``
    (``observe(..., hessians=True).hessians``): round group-wise int4 weights with GPTQ instead of to nearest."""
    c = model.config
    ops = NpOps()
    acts = [
        {n: ActQ.from_range(*map(float, qp.ranges[i][n]), scheme.bits(n)) for n in LAYER_ACTS} for i in range(c.layers)
    ]
    gacts = {n: ActQ.from_range(*map(float, qp.granges[n]), scheme.bits(n)) for n in GLOBAL_ACTS}
    layers = []
    for i, lw in enumerate(model.layers):
        p = {k: np.asarray(ops.np(v), np.float32) for k, v in qp.layers[i].items()}
        f = fold_layer(ops, {k: np.asarray(v, np.float64) for k, v in lw.items()}, p, c)
        d: dict[str, Any] = {
            k: np.asarray(f[k], np.float32) for k in ("attn_norm", "attn_norm_bias", "mlp_norm", "mlp_norm_bias")
        }
        for k in LINS:
            src = LINEAR_INPUTS[k]
            hs = None if hessians is None else hessians.get(f"{i}.{src}")
            d[k] = quantize_linear(
                f[k], f[k + "_b"], p["clip_" + k], scheme.weight_bits, acts[i][src].scale, scheme.group_size, hs
            )
        layers.append(d)
    ones = np.ones(model.embed.shape[0], np.float32)
    embed = quantize_linear(
        model.embed, np.zeros(model.embed.shape[0]), ones, scheme.embed_bits, gacts["final_in"].scale
    )
    head = None
    if model.lm_head is not None:
        head = quantize_linear(
            model.lm_head, np.zeros(model.lm_head.shape[0]), ones, scheme.embed_bits, gacts["final_in"].scale
        )
    meta = dict(meta or {})
    meta.update(
        {
            "weight_bits": scheme.weight_bits,
            "act_bits": scheme.act_bits,
            "act16": list(scheme.act16),
            "embed_bits": scheme.embed_bits,
            "group_size": scheme.group_size if scheme.weight_bits == 4 else 0,
            "gptq": hessians is not None,
        }
    )
    return QuantLM(
        c,
        embed,
        head,
        np.asarray(model.norm, np.float32),
        np.zeros(c.hidden, np.float32),
        layers,
        acts,
        gacts,
        meta=meta,
        tokenizer=model.tokenizer,
    )
