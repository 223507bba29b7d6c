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


@pytest.mark.parametrize(
    "target,family", [("host", None), ("rpi4", "dense_dot_4x4_i8i8s32_neon"), ("rpi5", "dense_dot_4x4_i8i8s32_sdot")]
)
def test_dense_layers_use_the_targets_intrinsic(target, family):
    t = get_target(target).tvm_target()
    low = lower(synth.resnet8(0, 8), 1, t)
    want = family or ("dense_" + kt.VNNI_INTRIN if kt.intrin_for(t) == kt.VNNI_INTRIN else "dense")
    assert want in set(low.kernels.values())


# ---- tensorized conv2d (packed [O/nb, KH, KW, I/kb, nb, kb] weights) -----------------------------


def _odd_conv_graph(bits: int = 8, seed: int = 7):
    """Channels that are not multiples of the tile (3, 6, 20, 12), 11 output columns (a prime: the column
    tile is 1 wide), stride 2, 'valid' and 'same' padding, a -128 weight, a dilated and an asymmetrically
    padded layer, a depthwise layer between."""
    g = synth.GraphBuilder(f"odd_conv_w{bits}", seed=seed, weight_bits=bits)
    x = g.input((1, 9, 11, 3))
    x = g.conv(x, 20, 3, 1)
    if bits == 8:
        g.qm.constants[g.qm.nodes[-1].params["weight"]][0, 0, 0, 0] = -128
    x = g.conv(x, 6, 1)
    x = g.conv(x, 6, 3, 1, groups=6)
    x = g.conv(x, 12, 3, 2, pad="valid")
    y = g.conv(x, 12, 3)
    node = g.qm.nodes[-1]
    node.attrs["dilations"] = [2, 2]
    node.attrs["pads"] = [2, 1, 2, 3]
    n, h, w, _ = g.shapes[x]
    g.qm.tensors[y].shape = [None, h + 4 - 4, w + 4 - 4, 12]
    g.shapes[y] = (n, h, w, 12)
    y = g.conv(y, 5, 1, relu=False)
    return g.output(y)


def _check_host(qm, batch: int = 1, n: int = 3):
    from tvm import relax

    low = lower(qm, batch, HOST)
    vm = relax.VirtualMachine(tvm.compile(low.mod, HOST), tvm.cpu())
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = rng.integers(-128, 128, size=low.inputs[0]["shape"]).astype(np.int8)
        ref = qm.run(x, integer=True)[qm.outputs[0].name]
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), ref)
    return low


def test_pack_weight_dot_layout():
    from kernels.conv2d import pack_weight_dot

    w = np.arange(5 * 3 * 3 * 7, dtype=np.int64).reshape(5, 3, 3, 7).astype(np.int8)
    wp = pack_weight_dot(w, 4, 4)
    assert wp.shape == (2, 3, 3, 2, 4, 4)
    assert wp[1, 2, 0, 1, 0, 2] == w[4, 2, 0, 6] and wp[1, 2, 0, 1, 1, 2] == 0 and wp[0, 1, 1, 1, 3, 3] == 0


@pytest.mark.skipif(kt.intrin_for(HOST) != kt.VNNI_INTRIN, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("bits", [8, 4])
def test_vnni_conv_odd_shapes_bit_exact(bits):
    low = _check_host(_odd_conv_graph(bits))
    fams = set(low.kernels.values())
    assert "conv2d_" + kt.VNNI_INTRIN + ("_int4" if bits == 4 else "") in fams


@pytest.mark.skipif(kt.intrin_for(HOST) != kt.VNNI_INTRIN, reason="this CPU has no AVX-512 VNNI")
def test_vnni_conv_wide_epilogue_and_batch():
    """Left shifts and tiny rescales (the 64-bit epilogue) and batch 2 through the tensorized conv."""
    from edgekit.quant import arith

    g = synth.GraphBuilder("shifts_dot", seed=5)
    x = g.input((2, 6, 6, 8))
    y = g.conv(x, 16, 3)
    node = g.qm.nodes[-1]
    ms, ss = zip(*(arith.quantize_multiplier(float(r)) for r in np.geomspace(2.0**-33, 3.0, 16)), strict=True)
    g.qm.constants[node.params["multiplier"]] = np.array(ms, np.int32)
    g.qm.constants[node.params["shift"]] = np.array(ss, np.int32)
    _check_host(g.output(y), batch=2)


def test_narrow_epilogue_matches_arith():
    """``requantize_expr_i32`` (one 32x32->64 multiply, nested roundings folded) against ``arith.requantize``
    on every right shift, extreme multipliers and accumulators at the int32 edge, and small left shifts."""
    from edgekit.quant import arith
    from kernels.requant import requantize_expr_i32

    rng = np.random.default_rng(0)
    xs = np.concatenate(
        [
            np.array([0, 1, -1, 2**31 - 1, -(2**31), 2**30, -(2**30), 12345, -12345], np.int64),
            rng.integers(-(2**31), 2**31, size=55),
        ]
    )
    shifts = np.arange(-31, 4, dtype=np.int32)
    mults = np.array([0, 1 << 30, (1 << 31) - 1, 1518500250, 1 << 30 | 1, -(2**31) + 1, 7] * 5, np.int32)[: shifts.size]
    n, c = xs.size, shifts.size
    X = te.placeholder((n, c), "int32", name="x")
    M = te.placeholder((c,), "int32", name="m")
    S = te.placeholder((c,), "int32", name="s")
    Y = te.compute((n, c), lambda i, j: requantize_expr_i32(X[i, j], M[j], S[j]), name="y")
    f = tvm.compile(tvm.IRModule({"main": te.create_prim_func([X, M, S, Y])}), HOST)
    xv = np.repeat(xs[:, None], c, axis=1)
    xv = np.where(shifts[None, :] > 0, xv >> np.maximum(shifts[None, :], 0), xv).astype(np.int32)  # narrow_ok
    out = tvm.runtime.tensor(np.zeros((n, c), np.int32))
    f(tvm.runtime.tensor(xv), tvm.runtime.tensor(mults), tvm.runtime.tensor(shifts), out)
    np.testing.assert_array_equal(out.numpy(), arith.requantize(xv, mults, shifts))


def test_narrow_ok_bounds():
    from kernels.requant import narrow_ok

    w = np.full((2, 3, 3, 64), 127, np.int8)
    b = np.zeros(2, np.int32)
    m = np.full(2, 1 << 30, np.int32)
    assert narrow_ok(w, b, m, np.array([-8, 0]))
    assert not narrow_ok(w, b, m, np.array([-8, 12]))  # 255 * 127 * 576 << 12 overflows int32
    assert not narrow_ok(w, b, np.array([-(2**31), 1], np.int32), np.array([-8, 0]))
    assert not narrow_ok(w, b, m, np.array([-32, 0]))


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_arm_conv_odd_shapes_bit_exact_under_qemu(target, tmp_path):
    """NEON (rpi4) and sdot (rpi5) tensorized convs, int8 and int4, under qemu-user."""
    from edgekit.compile import compile_model, emulate

    if not emulate.available():
        pytest.skip("needs qemu-user, aarch64-linux-gnu-g++ and the cached aarch64 TVM runtime")
    intrin = kt.intrin_for(get_target(target).tvm_target())
    for bits in (8, 4):
        res = compile_model(
            _odd_conv_graph(bits), target, tmp_path / f"odd{bits}.{target}.tar", verify=True, verify_inputs=3
        )
        ex = res.manifest["extra"]
        assert ex["verified"]["mismatches"] == 0 and ex["verified"]["how"].startswith("qemu-user")
        assert "conv2d_" + intrin + ("_int4" if bits == 4 else "") in ex["kernels"]


# ---- the tuner's design space: every knob setting is the same function ----------------------------


def _kernel_calls(mod):
    """(global var, arguments, output shape, output dtype) of each call_tir in ``main``; constant
    arguments as arrays, activations as their Relax variables."""
    from tvm import relax

    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.name == "relax.call_tir":
            gv, args = e.args[0], e.args[1]
            feed = [a.value.numpy() if isinstance(a, tvm.ir.expr.Constant) else a for a in args.fields]
            calls.append((gv, feed, [int(d) for d in e.ty.shape], str(e.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return calls


@pytest.mark.skipif(kt.intrin_for(HOST) != kt.VNNI_INTRIN, reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("bits", [8, 4])
def test_every_knob_setting_is_bit_exact(bits):
    """Each candidate schedule the tuner may pick (register tiles, loop orders) of every conv, depthwise
    and dense kernel (one conv with a fused residual add) computes exactly what the default schedule
    computes, on the kernel's real weights and rescales and random activations (the int4 graph: a
    seeded sample of 6 candidates per kernel)."""
    from kernels import space as ks

    g = synth.GraphBuilder(f"knobs_w{bits}", seed=3, weight_bits=bits)
    x = g.input((1, 9, 11, 3))
    x = g.conv(x, 20, 3, 1)
    x = g.conv(x, 20, 3, 1, groups=20)
    x = g.conv(x, 36, 3, 2)
    x = g.add(g.conv(x, 36, 3, 1), x)  # a residual add fused into the conv's epilogue
    x = g.conv(x, 40, 1)
    x = g.reshape(x, [None, 5 * 6 * 40])
    qm = g.output(g.dense(x, 10, bits=8))
    low = lower(qm, 2, HOST)
    rng = np.random.default_rng(bits)
    kinds, tried = set(), 0
    for gv, args, shape, dtype in _kernel_calls(low.mod):
        raw = low.unscheduled[gv]
        kind, _ = ks.kind_and_intrin(raw)
        if kind not in ks.TUNABLE:
            continue
        kinds.add(kind)
        feed = [
            tvm.runtime.tensor(
                a
                if isinstance(a, np.ndarray)
                else rng.integers(-128, 128, size=[int(d) for d in a.ty.shape]).astype(np.int8)
            )
            for a in args
        ]

        def run(func, feed=feed, shape=shape, dtype=dtype):
            f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST)
            out = tvm.runtime.tensor(np.zeros(shape, dtype))
            f(*feed, out)
            return out.numpy()

        want = run(low.mod[gv])
        cands = ks.design_space(tvm.s_tir.Schedule(raw))
        assert len(cands) > 1, f"{gv.name_hint}: nothing to tune"
        if bits == 4:
            cands = [cands[i] for i in rng.choice(len(cands), size=min(6, len(cands)), replace=False)]
        for c in cands:
            np.testing.assert_array_equal(run(c.mod["main"]), want, err_msg=f"{gv.name_hint}\n{c.trace}")
            tried += 1
    assert kinds == set(ks.TUNABLE) and tried >= 15
