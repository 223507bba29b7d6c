"""QuantLM linear layers compiled through TVM (edgekit's packed int8 GEMM kernels, tensorized with
VNNI / sdot / NEON, fused dyadic requantization; 16-bit activations as two int8 planes), bit-exact
against ``qlm``'s integers on the host and, for the Raspberry Pi targets, under qemu-user.

Most of this module's time is importing ``kernels.tensorize`` (TVM parses every target's tensor
intrinsics on import, ~10 s idle, ~1 min on a loaded machine); each build is a few seconds."""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytest.importorskip("tvm")

from edgekit.compile import emulate  # noqa: E402
from edgekit.llm.compile import (  # noqa: E402
    LMCompileError,
    compile_linears,
    linear_specs,
    random_inputs,
    trace_inputs,
    verify_linears,
)
from edgekit.llm.model import LlamaConfig, random_llama  # noqa: E402
from edgekit.llm.qlm import int_linear  # noqa: E402
from edgekit.llm.quantize import build_quantlm, calib_batches, calibrate  # noqa: E402
from edgekit.llm.sim import Scheme  # noqa: E402

CFG = LlamaConfig(vocab_size=64, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, rope_theta=10000.0)


def _quantlm(wbits: int):
    tiny = random_llama(CFG, seed=0)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 400)
    sch = Scheme(weight_bits=wbits)
    return build_quantlm(tiny, calibrate(tiny, "rtn", sch, calib_batches(tokens[200:], 32, 2)), sch)


@pytest.fixture(scope="module")
def qm8():
    return _quantlm(8)


def _inputs(qm, compiled, tokens: int) -> list[dict[str, np.ndarray]]:
    lay = compiled.lowered.layout
    # whole-range integers (accumulator worst cases) and the real activations of a prompt pass
    return [random_inputs(lay, tokens, seed=s) for s in range(2)] + [trace_inputs(qm, np.arange(5, 5 + tokens), lay)]


def test_specs_follow_the_executor(qm8):
    specs = linear_specs(qm8, [1], head=True)
    assert [s.name for s in specs] == ["1.q", "1.k", "1.v", "1.o", "1.gate", "1.up", "1.down", "lm_head"]
    kinds = {s.name: s.out_dtype for s in specs}
    # q/k: accumulators (qlm dequantizes them for RoPE); o_out/down_out: 16-bit; v/gate/up: 8-bit
    assert kinds["1.q"] == "int32" and kinds["1.v"] == "int8" and kinds["1.o"] == "int16"
    assert kinds["1.down"] == "int16" and kinds["1.gate"] == "int8"
    assert specs[6].xq.bits == 16 and specs[7].xq.bits == 16  # h and final_in: the split int8 planes path


@pytest.mark.parametrize("tensorize", [True, False])
def test_host_bit_exact(qm8, tensorize):
    c = compile_linears(qm8, "host", layers=[0, 1], head=True, tokens=3, tensorize=tensorize)
    rep = verify_linears(c, _inputs(qm8, c, 3))
    assert rep["mismatches"] == 0, rep
    assert rep["values"] == 3 * 3 * (2 * (32 * 3 + 16 * 2 + 64 * 2) + 64)
    if not tensorize:
        assert c.lowered.intrin is None
    # an accumulator output is qlm's int_linear itself
    acts = _inputs(qm8, c, 3)[2]
    (outs,), _ = c.run([acts])
    assert np.array_equal(outs[0], int_linear(acts["0.attn_in"], qm8.acts[0]["attn_in"], qm8.layers[0]["q"]))


needs_qemu = pytest.mark.skipif(not emulate.available(), reason="qemu-user / aarch64 g++ / aarch64 TVM runtime missing")


@needs_qemu
@pytest.mark.parametrize(("target", "wbits", "intrin"), [("rpi5", 8, "sdot"), ("rpi4", 4, "neon")])
def test_raspberry_pi_bit_exact_under_qemu(target, wbits, intrin, qm8):
    qm = qm8 if wbits == 8 else _quantlm(4)
    c = compile_linears(qm, target, layers=[1], head=True, tokens=1)  # one decode step
    assert intrin in c.lowered.intrin
    rep = verify_linears(c, _inputs(qm, c, 1))
    assert rep["mismatches"] == 0 and rep["how"].startswith("qemu-user"), rep


def test_group_wise_int4_compiles_through_its_int8_expansion(qm8):
    """Group-wise int4 (qlm keeps the exact int8 expansion as ``weight``) lowers like int8; a scale
    that is not per output channel is refused."""
    tiny = random_llama(CFG, seed=0)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 400)
    sch = Scheme(weight_bits=4, group_size=16)
    qg = build_quantlm(tiny, calibrate(tiny, "rtn", sch, calib_batches(tokens[200:], 32, 2)), sch)
    assert qg.layers[0]["up"].grouped
    c = compile_linears(qg, "host", layers=[0], tokens=2, tensorize=False)
    assert verify_linears(c, _inputs(qg, c, 2))["mismatches"] == 0
    bad = copy.deepcopy(qm8)
    lin = bad.layers[0]["q"]
    lin.w_scale = np.repeat(lin.w_scale[:, None], 2, axis=1)
    with pytest.raises(LMCompileError, match="per-output-channel"):
        linear_specs(bad, [0])
