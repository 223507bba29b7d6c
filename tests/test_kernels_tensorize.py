"""Tensorized int8 GEMM kernels (VNNI with the LLVM 22 fix, sdot, NEON) over pre-packed weights:
bit-exact, and selected from the target's CPU features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

tvm = pytest.importorskip("tvm")
from tvm import te  # noqa: E402

from edgekit.compile import synth  # noqa: E402
from edgekit.compile.lower import lower  # noqa: E402
from edgekit.compile.targets import get_target  # noqa: E402
from kernels import tensorize as kt  # noqa: E402

HOST = get_target("host").tvm_target()


def test_intrinsic_selection_from_target():
    assert kt.intrin_for(get_target("rpi5").tvm_target()) == kt.SDOT_INTRIN
    assert kt.intrin_for(get_target("android-arm64").tvm_target()) == kt.SDOT_INTRIN
    assert kt.intrin_for(get_target("rpi4").tvm_target()) == kt.NEON_INTRIN
    assert kt.intrin_for(tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})) == kt.VNNI_INTRIN
    assert kt.intrin_for(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) is None


def test_pack_weight_layout():
    w = np.arange(10 * 7, dtype=np.int64).reshape(10, 7).astype(np.int8)
    wp = kt.pack_weight(w, 4, 4)
    assert wp.shape == (3, 2, 4, 4)
    assert wp[1, 1, 2, 0] == w[6, 4] and wp[2, 1, 1, 3] == 0  # padding is zero


@pytest.mark.skipif(kt.intrin_for(HOST) != kt.VNNI_INTRIN, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("m,n,k", [(1, 10, 64), (33, 70, 130), (64, 128, 256)])
def test_vnni_gemm_bit_exact(m, n, k):
    rng = np.random.default_rng(m + n + k)
    x = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    w[0, :] = -128  # full int8 range: the pmaddubsw intrinsic would saturate here, vpdpbusd must not
    wp = kt.pack_weight(w, 16, 4)
    X = te.placeholder((m, k), "int8", name="x")
    W = te.placeholder(wp.shape, "int8", name="w")
    acc = kt.gemm_packed_acc(X, W, "uint8")
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, W, acc]))
    kt.schedule_gemm(sch, kt.VNNI_INTRIN, threads=2)
    f = tvm.compile(sch.mod, HOST)
    out = tvm.runtime.tensor(np.zeros([int(d) for d in acc.shape], np.int32))
    f(tvm.runtime.tensor(x), tvm.runtime.tensor(wp), out)
    ref = (x.astype(np.int64) + 128) @ w.T.astype(np.int64)
    np.testing.assert_array_equal(out.numpy().reshape(m, -1)[:, :n], ref)
    asm = f.mod.inspect_source("asm") if hasattr(f.mod, "inspect_source") else ""
    if asm:
        assert "vpdpbusd" in asm


@pytest.mark.parametrize("target,family", [("host", None), ("rpi4", "dense_dot_4x4_i8i8s32_neon"),
                                           ("rpi5", "dense_dot_4x4_i8i8s32_sdot")])
def test_dense_layers_use_the_targets_intrinsic(target, family):
    t = get_target(target).tvm_target()
    low = lower(synth.resnet8(0, 8), 1, t)
    want = family or ("dense_" + kt.VNNI_INTRIN if kt.intrin_for(t) == kt.VNNI_INTRIN else "dense")
    assert want in set(low.kernels.values())
