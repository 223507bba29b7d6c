"""Residual-add fusion on the TVM path: a conv2d whose only consumer is an add computes the add in its
epilogue (one ``conv2d..._add`` kernel named after the add), bit-exact with the reference executor;
the standalone add kernel runs in int32 when compile-time bounds prove it exact; the first-divergent-
layer search still maps kernel outputs to graph tensors when a conv has no kernel of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from edgekit.artifact import unpack_artifact  # noqa: E402
from edgekit.compile import compile_model  # noqa: E402
from edgekit.compile.build import quantize_input  # noqa: E402
from edgekit.compile.fusion import residual_fusions  # noqa: E402
from edgekit.compile.lower import _name, lower  # noqa: E402
from edgekit.compile.synth import GraphBuilder  # noqa: E402
from edgekit.compile.targets import get_target  # noqa: E402
from edgekit.device.validate import first_divergent_layer, kernel_outputs_by_tensor, locate_mismatch  # noqa: E402
from edgekit.quant.arith import quantize_multiplier  # noqa: E402
from kernels import elementwise as kew  # noqa: E402


def _residual_graph(seed: int, bits: int = 8):
    """conv -> conv -> add(skip from the first conv); two stride-2 branches -> add(conv, conv); an add whose
    conv operand is the second one; a standalone add of two adds (nothing to fuse); 24 channels (not a
    multiple of the VNNI block)."""
    g = GraphBuilder(f"residual_{seed}_w{bits}", seed, bits)
    x = g.input((1, 10, 12, 8))
    a = g.conv(x, 24, 3)
    b = g.conv(a, 24, 3, relu=False)
    s1 = g.add(b, a)  # b fused (operand 0); a is a skip connection, also read by b
    c = g.conv(s1, 32, 3, 2)
    d = g.conv(s1, 32, 1, 2, relu=False)
    s2 = g.add(c, d, relu=False)  # both from convs: c fused, d its own kernel
    e = g.conv(s2, 32, 3, relu=False)
    s3 = g.add(s2, e)  # e fused as operand 1
    return g.output(g.add(s3, s2, relu=False), softmax=False)  # standalone add (int32 path)


def _compile_and_check(qm, tmp_path: Path, name: str, tensorize: bool, n: int = 6):
    rng = np.random.default_rng(11)
    xs = [rng.integers(-128, 128, size=(1, 10, 12, 8)).astype(np.int8) for _ in range(n)]
    res = compile_model(qm, "host", tmp_path / f"{name}.tar", verify=True, verify_inputs=xs, tensorize=tensorize)
    assert res.manifest["extra"]["verified"]["mismatches"] == 0
    m = unpack_artifact(res.path, tmp_path / name)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / name / m["model_file"])), tvm.cpu())
    for x in xs[:2]:  # and once more by hand: the verifier is what the assertion above relies on
        ref = qm.run(x, integer=True)[qm.outputs[0].name]
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), ref)
    return res.manifest["extra"]["kernels"]


def test_fusion_plan_of_the_residual_graph():
    qm = _residual_graph(0)
    convs = [n.name for n in qm.nodes if n.op == "conv2d"]
    adds = [n.name for n in qm.nodes if n.op == "add"]
    plan = residual_fusions(qm)
    assert plan == {adds[0]: (convs[1], 0), adds[1]: (convs[2], 0), adds[2]: (convs[4], 1)}
    qm.outputs.append(type(qm.outputs[0])(qm.nodes[-2].inputs[1], ["dequantize"]))  # e becomes a graph output
    assert adds[2] not in residual_fusions(qm)


@pytest.mark.parametrize("bits", [8, 4])
def test_residual_graph_fused_bit_exact_tensorized_and_plain(bits, tmp_path):
    qm = _residual_graph(bits, bits)
    tz = _compile_and_check(qm, tmp_path, f"tz{bits}", tensorize=True)
    w4 = "_int4" if bits == 4 else ""
    assert f"conv2d_edgekit_dot_16x4_vnni{w4}_add" in tz and "add" in tz, tz
    plain = _compile_and_check(qm, tmp_path, f"plain{bits}", tensorize=False)
    assert f"conv2d{w4}_add" in plain and "add" in plain, plain
    low = lower(qm, 1, get_target("host").tvm_target())
    fused = [h for h, f in low.kernels.items() if f.endswith("_add") and f != "add"]
    assert len(fused) == 3 and all(h.split("_add_")[-1].startswith("add") for h in fused), fused
    for h in fused:  # the fused kernels got the tensorized conv schedule, not left unscheduled
        func = next(low.mod[gv] for gv in low.mod.functions if gv.name_hint == h)
        assert func.attrs["tirx.is_scheduled"] and "vpdpbusd" in func.script()


def test_standalone_add_int32_bounds_are_exact():
    """``add_narrow_ok`` against an exhaustive int64 check of every int8 pair, for random parameters
    around the TFLite ones (left shift 20) and some that must be refused."""
    from edgekit.quant import arith

    rng = np.random.default_rng(0)
    va, vb = np.meshgrid(np.arange(-128, 128, dtype=np.int64), np.arange(-128, 128, dtype=np.int64))
    accepted = 0
    for trial in range(40):
        ls = int(rng.choice([20, 20, 22, 23, 24]))
        p = _add_params(rng, ls, a_scale=4.0 if trial % 7 == 0 else 1.0)
        ma, sa, mb, sb, mo, so = (
            p[k] for k in ("multiplier_a", "shift_a", "multiplier_b", "shift_b", "multiplier", "shift")
        )
        if not kew.add_narrow_ok(**p):
            continue
        accepted += 1
        xa = np.left_shift(va - p["za"], ls)
        xb = np.left_shift(vb - p["zb"], ls)
        assert np.abs(xa).max() <= 2**31 - 1 and np.abs(xb).max() <= 2**31 - 1
        s = arith.requantize(xa, ma, sa) + arith.requantize(xb, mb, sb)
        y = arith.requantize(s, mo, so) + p["zout"]
        assert (
            np.abs(s).max() < 2**31 and np.abs(np.left_shift(s, max(so, 0))).max() < 2**31 and np.abs(y).max() < 2**31
        )
        for z, m, sh in ((p["za"], ma, sa), (p["zb"], mb, sb)):  # the split operand rescale, all 256 inputs
            split = kew._operand_split(z, ls, m, sh)
            if split is None:
                continue
            mh, ml, r, t = split
            d = np.arange(-128, 128, dtype=np.int64) - z
            lo = d * ml + r
            assert np.abs(d * mh).max() < 2**31 and np.abs(lo).max() < 2**31
            np.testing.assert_array_equal(d * mh + (lo >> t), arith.requantize(np.left_shift(d, ls), m, sh))
    assert accepted >= 10
    assert not kew.add_narrow_ok(
        za=0,
        zb=0,
        zout=0,
        left_shift=24,
        multiplier_a=2**30,
        shift_a=0,
        multiplier_b=2**30,
        shift_b=0,
        multiplier=2**30,
        shift=0,
    )


def _add_params(rng, ls: int, a_scale: float = 1.0) -> dict:
    """Random TFLite ADD parameters around left shift ``ls``; operand a's scale ratio times ``a_scale``."""
    ma, sa = quantize_multiplier(float(rng.uniform(0.05, 1.0)) * a_scale)
    mb, sb = quantize_multiplier(float(rng.uniform(0.05, 1.0)))
    mo, so = quantize_multiplier(2.0**-ls * float(rng.uniform(0.3, 4.0)))
    z = rng.integers(-128, 128, 3)
    return dict(
        za=int(z[0]),
        zb=int(z[1]),
        zout=int(z[2]),
        left_shift=ls,
        multiplier_a=ma,
        shift_a=sa,
        multiplier_b=mb,
        shift_b=sb,
        multiplier=mo,
        shift=so,
        act_min=-128,
        act_max=127,
    )


def test_standalone_add_kernel_exact_on_every_int8_pair():
    """The add kernel (int32 and int64 forms, the split 32-bit operand rescale and its fallback) against
    the reference formula on all 65536 input pairs."""
    from tvm import te

    from edgekit.quant import arith
    from kernels import space as kspace

    target = get_target("host").tvm_target()
    va, vb = (v.astype(np.int8) for v in np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij"))
    rng = np.random.default_rng(5)
    cases = [_add_params(rng, ls) for ls in (20, 20, 23, 4)] + [_add_params(rng, 16, a_scale=9.0)]
    cases.append(dict(cases[0], left_shift=24))  # int64 only (x << 24 does not fit int32)
    kinds = set()
    for p in cases:
        narrow = kew.add_narrow_ok(**p)
        kinds.add((narrow, kew._operand_split(p["za"], p["left_shift"], p["multiplier_a"], p["shift_a"]) is None))
        a, b = te.placeholder(va.shape, "int8", "a"), te.placeholder(vb.shape, "int8", "b")
        out = kew.add(a, b, **p)
        f = kspace.schedule_default(kspace.tag(te.create_prim_func([a, b, out]), kspace.kind_of("add")))
        lib = tvm.compile(tvm.IRModule({"main": f}), target=target)
        got = tvm.runtime.tensor(np.zeros(va.shape, np.int8))
        lib["main"](tvm.runtime.tensor(va), tvm.runtime.tensor(vb), got)
        xa = np.left_shift(va.astype(np.int64) - p["za"], p["left_shift"])
        xb = np.left_shift(vb.astype(np.int64) - p["zb"], p["left_shift"])
        s = arith.requantize(xa, p["multiplier_a"], p["shift_a"]) + arith.requantize(
            xb, p["multiplier_b"], p["shift_b"]
        )
        want = np.clip(arith.requantize(s, p["multiplier"], p["shift"]) + p["zout"], -128, 127)
        np.testing.assert_array_equal(got.numpy(), want.astype(np.int8), err_msg=str(p))
    assert {(True, False), (True, True)} <= kinds and any(not narrow for narrow, _ in kinds), kinds


def test_real_resnet8_three_fused_kernels_bit_exact(resnet8_int8, cifar_test, tmp_path):
    x, y = cifar_test
    idx = np.arange(0, len(x), 50)  # the test set is sorted by class: a strided subset covers all ten
    xs = quantize_input(resnet8_int8, x[idx].astype(np.float32))
    res = compile_model(resnet8_int8, "host", tmp_path / "r8.tar", verify=False)
    kinds = res.manifest["extra"]["kernels"]
    assert "conv2d_edgekit_dot_16x4_vnni_add" in kinds and "add" not in kinds, kinds
    m = unpack_artifact(res.path, tmp_path / "r8")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "r8" / m["model_file"])), tvm.cpu())
    got = np.concatenate([vm["main"](tvm.runtime.tensor(xs[i : i + 1])).numpy() for i in range(len(xs))])
    np.testing.assert_array_equal(got, resnet8_int8.run(xs, integer=True)[resnet8_int8.outputs[0].name])
    assert (got.argmax(1) == y[idx]).mean() > 0.6
    low = lower(resnet8_int8, 1, get_target("host").tvm_target())
    assert sum(f == "conv2d_edgekit_dot_16x4_vnni_add" for f in low.kernels.values()) == 3


class _FakeSession:
    def __init__(self, kernels):
        self.kernels = kernels

    def intermediates(self, inputs):
        return self.kernels


def test_first_divergent_layer_with_fused_kernels(resnet8_int8, cifar_test):
    """Kernel outputs named as the lowering names them (a fused conv has none): a wrong unfused conv is
    named; a wrong fused kernel names the add and the conv fused into it."""
    qm = resnet8_int8
    x1 = quantize_input(qm, cifar_test[0][7:8].astype(np.float32))
    host = qm.run_all({qm.inputs[0]: x1})
    low = lower(qm, 1, get_target("host").tvm_target())
    plan = residual_fusions(qm)
    fused_convs = {c for c, _ in plan.values()}
    with_kernels = [n for n in qm.nodes if n.op not in ("quantize", "reshape") and n.name not in fused_convs]
    assert len(with_kernels) == len(low.kernels) == 11
    dev = {h: host[n.outputs[0]].copy() for h, n in zip(low.kernels, with_kernels, strict=True)}
    mapped = kernel_outputs_by_tensor(qm, dev)
    assert len(mapped) == 11 and all(np.array_equal(v, host[t]) for t, v in mapped.items())
    assert first_divergent_layer(qm, mapped, host) is None

    convs = [n for n in qm.nodes if n.op == "conv2d"]
    hint = list(low.kernels)[with_kernels.index(convs[4])]  # the 5th conv, not fused
    bad = dict(dev)
    bad[hint] = bad[hint] ^ np.int8(1)
    layer = first_divergent_layer(qm, kernel_outputs_by_tensor(qm, bad), host)
    assert layer["layer"] == convs[4].name and layer["op"] == "conv2d"

    add = next(iter(plan))
    hint = next(h for h in low.kernels if h.startswith("conv2d_edgekit_dot_16x4_vnni_add_" + _name(add)))
    bad = dict(dev)
    bad[hint] = bad[hint] ^ np.int8(1)
    found = locate_mismatch(_FakeSession(bad), qm, {"runtime": "tvm"}, x1, "in", qm.inputs[0], 0)
    assert found["layer"] == add and found["op"] == "add" and found["fused_with"] == plan[add][0]
    assert found["compared_tensors"] == 11
