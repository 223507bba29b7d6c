"""Every kernel family, compiled untuned for the host, is bit-exact with the reference executor."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

tvm = pytest.importorskip("tvm")
from tvm import relax, te  # noqa: E402

from edgekit.compile import synth  # noqa: E402
from edgekit.compile.lower import lower  # noqa: E402
from edgekit.quant import arith  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm"})


def _run(qm, batch: int, n_inputs: int = 3, seed: int = 0):
    low = lower(qm, batch)
    vm = relax.VirtualMachine(tvm.compile(low.mod, HOST), tvm.cpu())
    rng = np.random.default_rng(seed)
    for _ in range(n_inputs):
        x = rng.integers(-128, 128, size=low.inputs[0]["shape"]).astype(np.int8)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        ref = qm.run(x, integer=True)[qm.outputs[0].name]
        np.testing.assert_array_equal(got, ref)
    return low


@pytest.mark.parametrize("seed", [0, 1])
def test_every_operator_bit_exact(seed):
    """conv (strided, grouped, depthwise x2, int4, valid), requantize, max/avg pool with padding,
    mul with a broadcast constant, concat with a rescale, pad, transpose, lut, clamp, int4 dense."""
    low = _run(synth.all_ops(seed), batch=2)
    fams = set(low.kernels.values())
    assert {
        "conv2d",
        "depthwise",
        "conv2d_int4",
        "dense_int4",
        "requantize",
        "pool",
        "mul",
        "concat",
        "pad",
        "transpose",
        "lut",
        "clamp",
    } <= fams


def test_conv_variants_bit_exact():
    g = synth.GraphBuilder("conv_variants", seed=3)
    x = g.input((1, 13, 10, 6))
    x = g.conv(x, 12, 3, 2)  # stride 2, odd sizes
    x = g.conv(x, 12, 5, 1, groups=12)  # depthwise 5x5
    x = g.conv(x, 24, 3, 1, groups=12)  # depthwise multiplier 2
    x = g.conv(x, 8, 1, 1, relu=False)  # pointwise, no clamp
    x = g.conv(x, 8, 3, 2, pad="valid", bits=4)  # int4 valid
    n = g.qm.nodes[-1]
    n.attrs["dilations"] = [1, 1]
    y = g.conv(x, 8, 1)
    g.qm.nodes[-1].attrs["act_max"] = 60  # ReLU6-like upper clamp
    _run(g.output(y), batch=1)


def test_dilated_and_asymmetric_padding():
    g = synth.GraphBuilder("dilated", seed=4)
    x = g.input((1, 12, 12, 4))
    y = g.conv(x, 8, 3)
    node = g.qm.nodes[-1]
    node.attrs["dilations"] = [2, 2]
    node.attrs["pads"] = [2, 1, 2, 3]
    oh = (12 + 4 - 5) // 1 + 1
    ow = (12 + 4 - 5) // 1 + 1
    g.qm.tensors[y].shape = [None, oh, ow, 8]
    _run(g.output(y), batch=1)


def test_positive_shifts_and_extreme_multipliers():
    """Rescales above 1 (left shifts) and tiny ones (right shifts of 30+) round as the reference does."""
    g = synth.GraphBuilder("shifts", seed=5)
    x = g.input((1, 6, 6, 8))
    y = g.conv(x, 16, 1)
    node = g.qm.nodes[-1]
    ms, ss = [], []
    for r in np.geomspace(2.0**-33, 3.0, 16):
        m, s = arith.quantize_multiplier(float(r))
        ms.append(m)
        ss.append(s)
    g.qm.constants[node.params["multiplier"]] = np.array(ms, np.int32)
    g.qm.constants[node.params["shift"]] = np.array(ss, np.int32)
    _run(g.output(y), batch=1, n_inputs=4)


def test_requantize_expr_matches_arith_on_edge_values():
    """The TIR epilogue against ``arith.requantize`` on int32 extremes, halves and every shift."""
    from kernels.requant import requantize_expr

    rng = np.random.default_rng(0)
    xs = np.concatenate(
        [
            np.array([0, 1, -1, 2**31 - 1, -(2**31), 2**30, -(2**30), 12345, -12345], np.int64),
            rng.integers(-(2**31), 2**31, size=55),
        ]
    )
    shifts = np.arange(-31, 4, dtype=np.int32)
    mults = np.array([0, 1 << 30, (1 << 31) - 1, 1518500250, 1 << 30 | 1] * 7, np.int32)[: shifts.size]
    n, c = xs.size, shifts.size
    X = te.placeholder((n, c), "int64", name="x")
    M = te.placeholder((c,), "int32", name="m")
    S = te.placeholder((c,), "int32", name="s")
    Y = te.compute((n, c), lambda i, j: requantize_expr(X[i, j], M[j], S[j]), name="y")
    f = tvm.compile(tvm.IRModule({"main": te.create_prim_func([X, M, S, Y])}), HOST)
    xv = np.repeat(xs[:, None], c, axis=1)
    # inputs of left shifts are bounded as int32 accumulators times 2**shift stay in int64
    xv = np.where(shifts[None, :] > 0, xv >> 4, xv)
    out = tvm.runtime.tensor(np.zeros((n, c), np.int64))
    f(tvm.runtime.tensor(xv), tvm.runtime.tensor(mults), tvm.runtime.tensor(shifts), out)
    np.testing.assert_array_equal(out.numpy(), arith.requantize(xv, mults, shifts))


def test_int4_unpack_matches_qmodel_format():
    from kernels.int4 import pack_int4, unpack_int4_te

    rng = np.random.default_rng(1)
    w = rng.integers(-8, 8, size=(5, 3, 3, 7)).astype(np.int8)  # odd element count
    packed = pack_int4(w)
    assert packed.nbytes == (w.size + 1) // 2
    P = te.placeholder(packed.shape, "uint8", name="p")
    W = unpack_int4_te(P, w.shape)
    f = tvm.compile(tvm.IRModule({"main": te.create_prim_func([P, W])}), HOST)
    out = tvm.runtime.tensor(np.zeros(w.shape, np.int8))
    f(tvm.runtime.tensor(packed), out)
    np.testing.assert_array_equal(out.numpy(), w)


@pytest.mark.parametrize(
    "shape,out,k,stride",
    [((1, 9, 11, 6), 6, 3, 1), ((1, 9, 11, 6), 12, 3, 1), ((1, 7, 13, 16), 16, 3, 2), ((1, 3, 5, 48), 48, 5, 1)],
)
def test_depthwise_schedule_edge_tiles(shape, out, k, stride):
    """The vectorized depthwise schedule when the column tile and the channel vector are 1 wide (11
    columns, 6 channels: nothing of the epilogue below the tile loop), multiplier 2, stride 2, 5x5."""
    g = synth.GraphBuilder("dw_tiles", seed=1)
    x = g.input(shape)
    y = g.conv(x, out, k, stride, groups=shape[3])
    low = _run(g.output(y), batch=1)
    assert "depthwise" in set(low.kernels.values())
