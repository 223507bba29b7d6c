"""Quantized Llama (``QuantLM``), its ``.ekq`` file format (``format: "edgekit.lm"``), and the integer
reference executor with a KV cache.

What is integer and what is not (per decoder layer):

- every linear (q k v o gate up down, lm_head): int8 (or 16-bit where chosen) activations minus their zero
  point, times int8/int4 per-output-channel symmetric weights (or group-wise int4 expanded to int8 by one
  integer multiply per weight, ``expand_int4_groups``), exact int32/int64 accumulation
  (``exact_int_matmul``), int32 bias, then a per-channel dyadic rescale (``requantize``) to the next
  static per-tensor scale;
- attention scores q.k^T and probs.v: integer matmuls of 8-bit (or 16-bit) operands; probs.v rescaled
  dyadically; the KV cache holds the integer k (after RoPE) and v;
- residual adds: two dyadic rescales into the output scale (16-bit by default), as TFLite's ADD;
- SiLU: a lookup table over the integer gate values; SiLU(gate) x up: integer product + dyadic rescale;
- embedding lookup: int8 row, per-row dyadic rescale to the residual scale;
- float32 steps between a dequantize and a quantize (as a QDQ runtime runs them): RMSNorm, RoPE
  (q/k projections are dequantized from their int32 accumulators), softmax, and the final logits.

Accumulators: int8 inputs provably fit int32 (``accumulator_bits``); a 16-bit input (by default only the
lm_head's) may not, so the reference accumulates in int64 (``exact_int_matmul``).

Activation tensor names (per layer): attn_in q k v probs attn_out o_out res_mid mlp_in gate up silu h
down_out res_out; and globally embed, final_in.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ModelFormatError
from edgekit.llm.model import LlamaConfig, apply_rope, rope_tables, silu, softmax
from edgekit.qmodel import pack_int4, unpack_int4, write_model_zip
from edgekit.quant.arith import exact_int_matmul, int_range, quantize_multiplier, requantize, rounding_rshift

FORMAT_NAME = "edgekit.lm"
FORMAT_VERSION = 2  # written only when a linear is group-wise int4; plain files stay version 1
READ_VERSIONS = (1, 2)

LAYER_ACTS = (
    "attn_in",
    "q",
    "k",
    "v",
    "probs",
    "attn_out",
    "o_out",
    "res_mid",
    "mlp_in",
    "gate",
    "up",
    "silu",
    "h",
    "down_out",
    "res_out",
)
GLOBAL_ACTS = ("embed", "final_in")
# each decoder linear -> the activation it reads
LINEAR_INPUTS = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "h",
}
# kept at 16 bits by default: the residual stream, the outputs added to it, softmax, the lm_head input
# "h" (SiLU(gate) * up, the down projection's input) is the outlier-heavy activation of SmolLM2: at 8 bits
# it alone costs +50% perplexity under RTN; at 16 bits MobileQuant W8A8 lands within 2% of float
# (BENCHMARK.md). MobileQuant keeps a few such activations at 16 bits too.
DEFAULT_ACT16 = ("embed", "res_mid", "res_out", "o_out", "down_out", "probs", "final_in", "h")


@dataclass
class ActQ:
    """Static per-tensor affine quantization of an activation: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int
    bits: int

    @property
    def qmin(self) -> int:
        return int_range(self.bits)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits)[1]

    @staticmethod
    def from_range(lo: float, hi: float, bits: int) -> ActQ:
        """Affine parameters covering [lo, hi] (widened to contain 0)."""
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        qmin, qmax = int_range(bits)
        scale = max(hi - lo, 1e-8) / (qmax - qmin)
        zp = int(np.clip(qmin - np.round(lo / scale), qmin, qmax))
        return ActQ(float(scale), zp, bits)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        q = np.round(np.asarray(x, np.float64) / self.scale) + self.zero_point
        return np.clip(q, self.qmin, self.qmax).astype(np.int32)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((np.asarray(q, np.float64) - self.zero_point) * self.scale).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "bits": self.bits}


@dataclass
class QLinear:
    """Integer weights [out, in] as the integer matmul takes them, a per-output-channel scale, an int32 bias.

    ``bits`` is the width of the values in ``weight`` (8, or 4 for per-channel int4). Group-wise int4
    (``group_size`` > 0, progressive as in QServe): ``q4`` [out, in] uint4 codes, ``g_scale`` in 1..16 and
    ``g_zero`` in 0..15 [out, in // group_size] per group; ``weight`` is then their exact int8 expansion
    ``(q4 - g_zero) * g_scale`` (``expand_int4_groups``, |value| <= 127), ``bits`` is 8 (what consumers of
    ``weight`` see) and ``w_scale`` is the per-channel scale of that int8 level. Files store only the 4-bit
    codes and group parameters (``storage_bits`` 4)."""

    weight: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray
    bits: int
    group_size: int = 0
    q4: np.ndarray | None = None
    g_scale: np.ndarray | None = None
    g_zero: np.ndarray | None = None

    @staticmethod
    def from_groups(
        q4: np.ndarray, g_scale: np.ndarray, g_zero: np.ndarray, group_size: int, w_scale: np.ndarray, bias: np.ndarray
    ) -> QLinear:
        q4, g_scale, g_zero = (np.asarray(a, np.uint8) for a in (q4, g_scale, g_zero))
        return QLinear(
            expand_int4_groups(q4, g_scale, g_zero, group_size),
            np.asarray(w_scale, np.float32),
            np.asarray(bias, np.int32),
            8,
            int(group_size),
            q4,
            g_scale,
            g_zero,
        )

    @property
    def grouped(self) -> bool:
        return self.group_size > 0

    @property
    def storage_bits(self) -> int:
        """Bits per weight as stored: 4 for group-wise int4 (plus one byte per group), else ``bits``."""
        return 4 if self.grouped else self.bits

    def weight_nbytes(self) -> float:
        """Bytes of the integer weights as stored (group-wise: 4-bit codes + 4-bit scale + 4-bit zero per group)."""
        if self.grouped:
            return self.weight.size / 2 + self.g_scale.size
        return self.weight.size * self.bits / 8


def expand_int4_groups(q4: np.ndarray, g_scale: np.ndarray, g_zero: np.ndarray, group_size: int) -> np.ndarray:
    """int8 weights from group-wise uint4 codes: ``(q4 - z) * s`` per group, one integer multiply per weight."""
    q4 = np.asarray(q4)
    if q4.shape[1] != g_scale.shape[1] * group_size or g_scale.shape != g_zero.shape:
        raise ModelFormatError(f"group-wise int4: codes {q4.shape} do not match {g_scale.shape} groups of {group_size}")
    s = np.repeat(np.asarray(g_scale, np.int16), group_size, axis=1)
    z = np.repeat(np.asarray(g_zero, np.int16), group_size, axis=1)
    w = (q4.astype(np.int16) - z) * s
    if w.size and np.abs(w).max() > 127:
        raise ModelFormatError("group-wise int4 weights expand outside int8: corrupt group scales or zero points")
    return w.astype(np.int8)


@dataclass
class QuantLM:
    """An integer Llama: quantized linears, float norm weights (applied in the float RMSNorm step),
    static activation quantization per named tensor."""

    config: LlamaConfig
    embed: QLinear  # tied: also the lm_head
    lm_head: QLinear | None
    norm: np.ndarray
    norm_bias: np.ndarray
    layers: list[dict[str, Any]]  # linears (QLinear), attn_norm/attn_norm_bias/mlp_norm/mlp_norm_bias arrays
    acts: list[dict[str, ActQ]]  # per layer
    gacts: dict[str, ActQ]
    meta: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    @property
    def head(self) -> QLinear:
        return self.embed if self.lm_head is None else self.lm_head

    # ---- file format -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """A zip of ``model.json`` and ``.npy`` arrays (no pickle); int4 weights packed two per byte."""
        path = Path(path)
        arrays: list[tuple[dict[str, Any], np.ndarray]] = []

        def add(name: str, a: np.ndarray, bits: int = 0, offset: int = 0) -> str:
            entry = {
                "name": name,
                "file": f"arrays/{len(arrays):05d}.npy",
                "dtype": str(a.dtype),
                "shape": list(a.shape),
            }
            if bits == 4:
                entry["packed_int4"] = True
                if offset:  # unsigned 4-bit values stored as value - offset in [-8, 7]
                    entry["int4_offset"] = offset
                    a = a.astype(np.int16) - offset
                a = pack_int4(a)
            arrays.append((entry, a))
            return name

        def lin(prefix: str, q: QLinear) -> dict[str, Any]:
            d: dict[str, Any] = {
                "w_scale": add(prefix + ".w_scale", q.w_scale),
                "bias": add(prefix + ".bias", q.bias),
                "bits": q.bits,
            }
            if q.grouped:
                d.update(
                    {
                        "q4": add(prefix + ".q4", q.q4, 4, 8),
                        "g_scale": add(prefix + ".g_scale", q.g_scale, 4, 9),
                        "g_zero": add(prefix + ".g_zero", q.g_zero, 4, 8),
                        "group_size": q.group_size,
                    }
                )
            else:
                d["weight"] = add(prefix + ".weight", q.weight, q.bits)
            return d

        layers = []
        for i, lw in enumerate(self.layers):
            d: dict[str, Any] = {}
            for k, v in lw.items():
                d[k] = lin(f"layers.{i}.{k}", v) if isinstance(v, QLinear) else {"array": add(f"layers.{i}.{k}", v)}
            layers.append(d)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if self.grouped() else 1,
            "config": self.config.to_json(),
            "embed": lin("embed", self.embed),
            "lm_head": None if self.lm_head is None else lin("lm_head", self.lm_head),
            "norm": add("norm", self.norm),
            "norm_bias": add("norm_bias", self.norm_bias),
            "layers": layers,
            "acts": [{k: a.to_json() for k, a in la.items()} for la in self.acts],
            "global_acts": {k: a.to_json() for k, a in self.gacts.items()},
            "meta": self.meta,
            "tokenizer": None if self.tokenizer is None else self.tokenizer.to_str(),
        }
        manifest["arrays"] = [e for e, _ in arrays]
        return write_model_zip(path, manifest, arrays)

    def linears(self) -> list[QLinear]:
        out = [self.embed] + ([] if self.lm_head is None else [self.lm_head])
        return out + [v for lw in self.layers for v in lw.values() if isinstance(v, QLinear)]

    def grouped(self) -> bool:
        return any(q.grouped for q in self.linears())

    def weight_bytes(self) -> float:
        """Bytes of integer weights as stored (at their bit width; group-wise int4 with its group parameters)."""
        return float(sum(q.weight_nbytes() for q in self.linears()))


def accumulator_bits(qm: QuantLM) -> dict[str, int]:
    """Worst-case signed accumulator width of every linear: max|x - zp| * sum|w| + |bias| over output channels.

    int8 inputs fit int32 everywhere; a 16-bit input (the lm_head's by default) may need more: the reference
    executor accumulates in int64, a device kernel must split or widen there."""
    out: dict[str, int] = {}

    def bits(lin: QLinear, xq: ActQ) -> int:
        xmax = max(abs(xq.qmin - xq.zero_point), abs(xq.qmax - xq.zero_point))
        bound = xmax * np.abs(lin.weight.astype(np.int64)).sum(1) + np.abs(lin.bias.astype(np.int64))
        return int(bound.max()).bit_length() + 1

    for i, (lw, a) in enumerate(zip(qm.layers, qm.acts, strict=True)):
        for k, src in LINEAR_INPUTS.items():
            out[f"{i}.{k}"] = bits(lw[k], a[src])
    out["lm_head"] = bits(qm.head, qm.gacts["final_in"])
    return out


def load_lm(path: str | Path) -> QuantLM:
    """Read a ``.ekq`` file written by ``QuantLM.save``."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            m = json.loads(z.read("model.json"))
            if m.get("format") != FORMAT_NAME:
                raise ModelFormatError(f"{path}: not an edgekit language model (format {m.get('format')!r})")
            if m.get("version") not in READ_VERSIONS:
                raise ModelFormatError(
                    f"{path}: edgekit.lm version {m.get('version')} is not supported "
                    f"(this edgekit reads {READ_VERSIONS}); re-export the model"
                )
            arr: dict[str, np.ndarray] = {}
            for e in m["arrays"]:
                a = np.load(io.BytesIO(z.read(e["file"])), allow_pickle=False)
                if e.get("packed_int4"):
                    a = unpack_int4(a, tuple(e["shape"])).astype(np.int16) + int(e.get("int4_offset", 0))
                arr[e["name"]] = a.astype(e["dtype"]).reshape(e["shape"])
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, json.JSONDecodeError, OSError) as exc:
        raise ModelFormatError(f"{path}: not a readable edgekit.lm file ({exc}); re-export it") from exc

    def lin(d: dict[str, Any]) -> QLinear:
        if d.get("group_size"):
            return QLinear.from_groups(
                arr[d["q4"]],
                arr[d["g_scale"]],
                arr[d["g_zero"]],
                int(d["group_size"]),
                arr[d["w_scale"]],
                arr[d["bias"]],
            )
        return QLinear(arr[d["weight"]], arr[d["w_scale"]], arr[d["bias"]], int(d["bits"]))

    def act(d: dict[str, Any]) -> ActQ:
        return ActQ(float(d["scale"]), int(d["zero_point"]), int(d["bits"]))

    layers = [{k: lin(v) if "w_scale" in v else arr[v["array"]] for k, v in lw.items()} for lw in m["layers"]]
    tok = None
    if m.get("tokenizer"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(m["tokenizer"])
    return QuantLM(
        config=LlamaConfig.from_json(m["config"]),
        embed=lin(m["embed"]),
        lm_head=None if m["lm_head"] is None else lin(m["lm_head"]),
        norm=arr[m["norm"]],
        norm_bias=arr[m["norm_bias"]],
        layers=layers,
        acts=[{k: act(v) for k, v in la.items()} for la in m["acts"]],
        gacts={k: act(v) for k, v in m["global_acts"].items()},
        meta=m.get("meta", {}),
        tokenizer=tok,
    )


# ---- integer reference executor ------------------------------------------------------------------------


_MULT_CACHE: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}


def _mult(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dyadic multipliers and shifts of real rescales, memoized: the scales of a model are fixed, so a
    decode step would otherwise redo the same per-channel Python loop for every linear (~30% of a step)."""
    real = np.asarray(real, np.float64)
    key = real.tobytes() + repr(real.shape).encode()
    hit = _MULT_CACHE.get(key)
    if hit is not None:
        return hit
    ms = [quantize_multiplier(float(r)) for r in np.ravel(real)]
    out = (
        np.array([m for m, _ in ms], np.int64).reshape(np.shape(real)),
        np.array([s for _, s in ms], np.int64).reshape(np.shape(real)),
    )
    if len(_MULT_CACHE) > 4096:  # per-token keys (the embedding's row scales) must not grow without bound
        _MULT_CACHE.clear()
    _MULT_CACHE[key] = out
    return out


def int_linear(x: np.ndarray, xq: ActQ, lin: QLinear) -> np.ndarray:
    """int64 accumulator of (x - zp) @ W^T + bias."""
    a = x.astype(np.int64) - xq.zero_point
    return exact_int_matmul(a, lin.weight.T.astype(np.int64)) + lin.bias.astype(np.int64)


def rescale_to(acc: np.ndarray, real: np.ndarray | float, out: ActQ) -> np.ndarray:
    """Dyadic rescale of an integer accumulator into ``out``'s integer grid (clamped)."""
    m, s = _mult(np.asarray(real, np.float64))
    y = requantize(acc, m, s) + out.zero_point
    return np.clip(y, out.qmin, out.qmax).astype(np.int32)


def int_add(a: np.ndarray, aq: ActQ, b: np.ndarray, bq: ActQ, out: ActQ) -> np.ndarray:
    """TFLite-style ADD: both inputs (minus zero points, shifted left) rescaled into the output scale."""
    left = 30 - max(aq.bits, bq.bits) - 1
    ma, sa = quantize_multiplier(aq.scale / out.scale / 2**left)
    mb, sb = quantize_multiplier(bq.scale / out.scale / 2**left)
    ya = requantize((a.astype(np.int64) - aq.zero_point) << left, ma, sa)
    yb = requantize((b.astype(np.int64) - bq.zero_point) << left, mb, sb)
    return np.clip(ya + yb + out.zero_point, out.qmin, out.qmax).astype(np.int32)


def silu_table(gq: ActQ, sq: ActQ) -> np.ndarray:
    """SiLU as a lookup table from every integer gate value to the integer SiLU output."""
    codes = np.arange(gq.qmin, gq.qmax + 1)
    return sq.quantize(silu(gq.dequantize(codes).astype(np.float64)))


class KVCache:
    """Integer k (after RoPE) and v per layer, [kv_heads, T, head_dim]."""

    def __init__(self, layers: int):
        self.k: list[np.ndarray | None] = [None] * layers
        self.v: list[np.ndarray | None] = [None] * layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else int(self.k[0].shape[1])


def _rms(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w + b


# ---- integer-only RMSNorm, RoPE and softmax (opt-in: ``int_forward(..., integer_ops=True)``) -----------------
# The default executor runs these three in float32 between a dequantize and a quantize, as a QDQ runtime does
# (and as the ONNX export and device lowerings reproduce). With ``integer_ops`` they use integers only:
# - RMSNorm: int64 sum of squares, an integer reciprocal square root (30-bit mantissa, Newton integer sqrt,
#   17-bit result), per-channel dyadic multiply by gain / output scale, bias with 8 fractional bits;
# - RoPE: q/k accumulators dyadically rescaled to the output grid with 8 fractional bits, rotated with Q14
#   cos/sin tables, one rounding shift;
# - softmax: integer row max, the scaled difference on a 1/1024 grid by a dyadic multiply, exp(-x) as the
#   product of two Q15 tables (integer part 0..15, fraction /1024), integer division to Q30 probabilities,
#   dyadic rescale to the probs grid.

ROPE_FRAC = 14  # cos/sin table bits
MID_FRAC = 8  # extra fractional bits of intermediates
EXP_FRAC = 10  # softmax exponent grid 2**-EXP_FRAC (table of 1024 + 16 entries)
EXP_INT = 16  # exp(-x) is taken as 0 beyond x = 16 (below a 16-bit probability step)
_EXP_HI = np.round(np.exp(-np.arange(EXP_INT, dtype=np.float64)) * 2**15).astype(np.int64)
_EXP_LO = np.round(np.exp(-np.arange(2**EXP_FRAC, dtype=np.float64) / 2**EXP_FRAC) * 2**15).astype(np.int64)


def bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values, elementwise (integer shifts only)."""
    t = np.asarray(v, np.int64).copy()
    n = np.zeros(t.shape, np.int64)
    for sh in (32, 16, 8, 4, 2, 1):
        big = t >= (np.int64(1) << sh)
        n += big * sh
        t = np.where(big, t >> sh, t)
    return n + (t > 0)


def isqrt64(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of non-negative int64 values: integer Newton iteration from a power of two above."""
    v = np.asarray(v, np.int64)
    x = np.where(v > 0, np.left_shift(np.int64(1), (bit_length(v) + 1) // 2), 0)
    for _ in range(70):
        y = (x + v // np.maximum(x, 1)) // 2
        if not np.any(y < x):
            break
        x = np.where(y < x, y, x)
    return x


def _signed_mult(real: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.asarray(real, np.float64)
    m, sh = _mult(np.abs(r))
    return m, sh, np.where(r < 0, -1, 1).astype(np.int64)


def int_rmsnorm(x: np.ndarray, xq: ActQ, w: np.ndarray, b: np.ndarray, out: ActQ, eps: float) -> np.ndarray:
    """Integer RMSNorm of x (on xq's grid) into ``out``'s grid: y = x / rms(x) * w + b."""
    xc = x.astype(np.int64) - xq.zero_point
    n = xc.shape[-1]
    ms = ((xc * xc).sum(-1) + n // 2) // n + int(round(eps / xq.scale**2))
    ms = np.maximum(ms, 1)
    e = (bit_length(ms) + 1) // 2  # ms ~ 2**(2e)
    mant = np.where(
        2 * e >= 30, np.right_shift(ms, np.maximum(2 * e - 30, 0)), np.left_shift(ms, np.maximum(30 - 2 * e, 0))
    )  # [2**28, 2**30)
    r = isqrt64((np.int64(1) << 62) // mant)  # 2**31 / sqrt(mant), 17 bits; 1/sqrt(ms) = r * 2**(-16 - e)
    n16 = rounding_rshift(xc * r[..., None], e[..., None])  # x / rms * 2**16, |.| <= sqrt(n) * 2**16
    m, sh, sg = _signed_mult(np.asarray(w, np.float64) / (out.scale * 2 ** (16 - MID_FRAC)))
    y = requantize(n16 * sg, m, sh) + np.round(np.asarray(b, np.float64) / out.scale * 2**MID_FRAC).astype(np.int64)
    return np.clip(rounding_rshift(y, MID_FRAC) + out.zero_point, out.qmin, out.qmax).astype(np.int32)


def rope_int_tables(head_dim: int, positions: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Q14 cos/sin [T, head_dim]."""
    cos, sin = rope_tables(head_dim, positions, theta)
    return (
        np.round(cos.astype(np.float64) * 2**ROPE_FRAC).astype(np.int64),
        np.round(sin.astype(np.float64) * 2**ROPE_FRAC).astype(np.int64),
    )


def int_rope(
    acc: np.ndarray, real: np.ndarray, out: ActQ, heads: int, head_dim: int, cos_q: np.ndarray, sin_q: np.ndarray
) -> np.ndarray:
    """q or k accumulators [T, heads * head_dim] (real value acc * real per channel) -> RoPE -> out's grid,
    [heads, T, head_dim]."""
    t = acc.shape[0]
    m, sh = _mult(np.asarray(real, np.float64) / out.scale * 2**MID_FRAC)
    u = requantize(acc, m, sh).reshape(t, heads, head_dim).transpose(1, 0, 2)
    h = head_dim // 2
    rot = np.concatenate([-u[..., h:], u[..., :h]], axis=-1)
    y = rounding_rshift(u * cos_q + rot * sin_q, ROPE_FRAC + MID_FRAC) + out.zero_point
    return np.clip(y, out.qmin, out.qmax).astype(np.int32)


def int_softmax(sc: np.ndarray, real: float, mask: np.ndarray, out: ActQ) -> np.ndarray:
    """Softmax over the last axis of integer scores ``sc`` (real value sc * real), masked positions excluded,
    into ``out``'s grid."""
    sc = np.asarray(sc, np.int64)
    mx = np.where(mask, np.iinfo(np.int64).min, sc).max(-1, keepdims=True)  # every row has an unmasked entry
    d = np.where(mask, 0, mx - sc)  # >= 0
    m, sh = quantize_multiplier(real * 2**EXP_FRAC)
    cap = (2**31 - 1) >> max(sh, 0)
    idx = requantize(np.where(mask, cap, np.minimum(d, cap)), m, sh)  # (max - x) on a 2**-EXP_FRAC grid
    live = (idx < EXP_INT << EXP_FRAC) & ~mask
    idx = np.clip(idx, 0, (EXP_INT << EXP_FRAC) - 1)
    e = np.where(live, (_EXP_HI[idx >> EXP_FRAC] * _EXP_LO[idx & (2**EXP_FRAC - 1)] + 2**14) >> 15, 0)
    total = e.sum(-1, keepdims=True)  # >= 2**15 (the maximum's own term)
    p30 = ((e << 30) + total // 2) // total
    mo, so = quantize_multiplier(2.0**-30 / out.scale)
    return np.clip(requantize(p30, mo, so) + out.zero_point, out.qmin, out.qmax).astype(np.int32)


def int_forward(
    qm: QuantLM,
    ids: np.ndarray,
    cache: KVCache | None = None,
    *,
    logits: bool = True,
    trace: dict[str, np.ndarray] | None = None,
    integer_ops: bool = False,
    linear: Callable[[np.ndarray, ActQ, QLinear], np.ndarray] = int_linear,
) -> np.ndarray:
    """Run token ids (one sequence) through the integer model; with ``cache`` the ids continue it.
    Returns float logits [T, V] (dequantized from int32 accumulators) or the integer final_in.
    ``integer_ops``: RMSNorm, RoPE and softmax in integers too (``int_rmsnorm``, ``int_rope``,
    ``int_softmax``) instead of float32 between dequantize and quantize. ``linear`` computes every
    linear's accumulator (default ``int_linear``; the device runtime passes compiled kernels that must
    return exactly the same integers)."""
    c = qm.config
    ids = np.asarray(ids, dtype=np.int64)
    t = len(ids)
    start = 0 if cache is None else cache.length
    g = qm.gacts
    # embedding: int8 row times its per-row scale, dyadically rescaled to the residual scale
    e = qm.embed
    x = rescale_to(e.weight[ids].astype(np.int64), (e.w_scale[ids] / g["embed"].scale)[:, None], g["embed"])
    xq = g["embed"]

    def tr(name: str, q: np.ndarray, aq: ActQ) -> None:
        if trace is not None:
            trace[name] = aq.dequantize(q)

    tr("embed", x, xq)
    cos, sin = rope_tables(c.head_dim, np.arange(start, start + t), c.rope_theta)
    if integer_ops:
        cos_q, sin_q = rope_int_tables(c.head_dim, np.arange(start, start + t), c.rope_theta)

    def norm(x: np.ndarray, xq: ActQ, w: np.ndarray, b: np.ndarray, out: ActQ) -> np.ndarray:
        if integer_ops:
            return int_rmsnorm(x, xq, w, b, out, c.rms_eps)
        return out.quantize(_rms(xq.dequantize(x), w, b, c.rms_eps))

    grp = c.heads // c.kv_heads
    for i, (lw, a) in enumerate(zip(qm.layers, qm.acts, strict=True)):
        h = h0 = norm(x, xq, lw["attn_norm"], lw["attn_norm_bias"], a["attn_in"])
        qacc = linear(h, a["attn_in"], lw["q"])
        kacc = linear(h, a["attn_in"], lw["k"])
        if integer_ops:
            q = int_rope(
                qacc, a["attn_in"].scale * lw["q"].w_scale.astype(np.float64), a["q"], c.heads, c.head_dim, cos_q, sin_q
            )
            k = int_rope(
                kacc,
                a["attn_in"].scale * lw["k"].w_scale.astype(np.float64),
                a["k"],
                c.kv_heads,
                c.head_dim,
                cos_q,
                sin_q,
            )
        else:
            q = (qacc * (a["attn_in"].scale * lw["q"].w_scale)).astype(np.float32)
            k = (kacc * (a["attn_in"].scale * lw["k"].w_scale)).astype(np.float32)
            q = a["q"].quantize(apply_rope(q.reshape(t, c.heads, c.head_dim).transpose(1, 0, 2), cos, sin))
            k = a["k"].quantize(apply_rope(k.reshape(t, c.kv_heads, c.head_dim).transpose(1, 0, 2), cos, sin))
        v = rescale_to(linear(h, a["attn_in"], lw["v"]), a["attn_in"].scale * lw["v"].w_scale / a["v"].scale, a["v"])
        v = v.reshape(t, c.kv_heads, c.head_dim).transpose(1, 0, 2)
        if cache is not None:
            if cache.k[i] is not None:
                k = np.concatenate([cache.k[i], k], axis=1)
                v = np.concatenate([cache.v[i], v], axis=1)
            cache.k[i], cache.v[i] = k, v
        tk = k.shape[1]
        kk = np.repeat(k.astype(np.int64) - a["k"].zero_point, grp, axis=0)
        vv = np.repeat(v.astype(np.int64) - a["v"].zero_point, grp, axis=0)
        sc = exact_int_matmul(q.astype(np.int64) - a["q"].zero_point, kk.transpose(0, 2, 1))
        mask = np.arange(tk)[None, :] > (start + np.arange(t))[:, None]
        if integer_ops:
            p = int_softmax(sc, a["q"].scale * a["k"].scale / np.sqrt(c.head_dim), mask[None], a["probs"])
        else:
            scores = sc.astype(np.float64) * (a["q"].scale * a["k"].scale / np.sqrt(c.head_dim))
            scores = np.where(mask[None], -np.inf, scores)
            p = a["probs"].quantize(softmax(scores))
        pv = exact_int_matmul(p.astype(np.int64) - a["probs"].zero_point, vv)  # [heads, t, d]
        pv = pv.transpose(1, 0, 2).reshape(t, c.hidden)
        att = rescale_to(pv, a["probs"].scale * a["v"].scale / a["attn_out"].scale, a["attn_out"])
        o = rescale_to(
            linear(att, a["attn_out"], lw["o"]),
            a["attn_out"].scale * lw["o"].w_scale / a["o_out"].scale,
            a["o_out"],
        )
        x = xm = int_add(x, xq, o, a["o_out"], a["res_mid"])
        xq = a["res_mid"]
        h = norm(x, xq, lw["mlp_norm"], lw["mlp_norm_bias"], a["mlp_in"])
        gt = rescale_to(
            linear(h, a["mlp_in"], lw["gate"]), a["mlp_in"].scale * lw["gate"].w_scale / a["gate"].scale, a["gate"]
        )
        up = rescale_to(linear(h, a["mlp_in"], lw["up"]), a["mlp_in"].scale * lw["up"].w_scale / a["up"].scale, a["up"])
        sl = silu_table(a["gate"], a["silu"])[gt - a["gate"].qmin]
        prod = (sl.astype(np.int64) - a["silu"].zero_point) * (up.astype(np.int64) - a["up"].zero_point)
        hh = rescale_to(prod, a["silu"].scale * a["up"].scale / a["h"].scale, a["h"])
        d = rescale_to(
            linear(hh, a["h"], lw["down"]), a["h"].scale * lw["down"].w_scale / a["down_out"].scale, a["down_out"]
        )
        x = int_add(x, xq, d, a["down_out"], a["res_out"])
        xq = a["res_out"]
        if trace is not None:
            for n, val in (
                ("attn_in", h0),
                ("q", q),
                ("k", k),
                ("v", v),
                ("probs", p),
                ("attn_out", att),
                ("o_out", o),
                ("res_mid", xm),
                ("mlp_in", h),
                ("gate", gt),
                ("up", up),
                ("silu", sl),
                ("h", hh),
                ("down_out", d),
                ("res_out", x),
            ):
                tr(f"{i}.{n}", val, a[n])
    f = norm(x, xq, qm.norm, qm.norm_bias, g["final_in"])
    tr("final_in", f, g["final_in"])
    if not logits:
        return f
    acc = linear(f, g["final_in"], qm.head)
    return (acc * (g["final_in"].scale * qm.head.w_scale)).astype(np.float32)


def generate(
    model: QuantLM,
    prompt_ids: list[int] | np.ndarray,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    integer_ops: bool = False,
) -> list[int]:
    """Greedy generation with an integer KV cache: the prompt in one pass, then one token per step."""
    cache = KVCache(model.config.layers)
    out: list[int] = []
    lg = int_forward(model, np.asarray(prompt_ids), cache, integer_ops=integer_ops)
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(lg[-1]))
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        lg = int_forward(model, np.array([nxt]), cache, integer_ops=integer_ops)
    return out
