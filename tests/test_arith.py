"""The rounding rule: hand-computed cases, properties, and LiteRT's own kernels."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgekit.qmodel import pack_int4, unpack_int4
from edgekit.quant import arith

from .conftest import DATA


def ref_requantize(x: int, m: int, shift: int) -> int:
    """The documented rule written with Python integers, step by step."""
    a = x * 2 ** max(shift, 0)
    h = math.floor(Fraction(a * m, 2**31) + Fraction(1, 2))  # SQRDMULH: round half up
    n = max(-shift, 0)
    return h if n == 0 else math.floor(Fraction(h, 2**n) + Fraction(1, 2))  # RSHR: round half up


@pytest.mark.parametrize(
    "x, m, shift, expected",
    [
        # multiplier 0.5 exactly (M = 2^30, shift 0): ties go up, also for negatives
        (3, 1 << 30, 0, 2),  # 1.5 -> 2
        (-3, 1 << 30, 0, -1),  # -1.5 -> -1 (half up, not away from zero)
        (-5, 1 << 30, 0, -2),  # -2.5 -> -2
        (-1, 1 << 30, 0, 0),  # -0.5 -> 0
        (1, 1 << 30, 0, 1),  # 0.5 -> 1
        # right shift only: multiplier 0.5 * 2^-2 = 1/8
        (12, 1 << 30, -2, 2),  # h = 6, 6/4 = 1.5 -> 2
        (-12, 1 << 30, -2, -1),  # h = -6, -6/4 = -1.5 -> -1
        (-20, 1 << 30, -2, -2),  # h = -10, -2.5 -> -2
        # shift 0 with the largest multiplier keeps values (almost) unchanged
        (1000, (1 << 31) - 1, 0, 1000),
        (-1000, (1 << 31) - 1, 0, -1000),
        # shift -31: everything but the extremes rounds to 0 or +-1
        (2**31 - 1, (1 << 31) - 1, -31, 1),
        (-(2**31), (1 << 31) - 1, -31, -1),
        (2**30, 1 << 30, -31, 0),  # 2^30 * 2^-1 * 2^-31 = 2^-2 -> 0
        # left shift (multiplier > 1): 0.75 * 2^3 = 6
        (7, 3 << 29, 3, 42),
        (-7, 3 << 29, 3, -42),
        # extremes of int32
        (2**31 - 1, 1 << 30, 0, 2**30),  # (2^31-1)/2 = 2^30 - 0.5 -> 2^30
        (-(2**31), 1 << 30, 0, -(2**30)),
        (0, (1 << 31) - 1, -31, 0),
    ],
)
def test_rounding_rule_hand_computed(x, m, shift, expected):
    assert arith.requantize_scalar(x, m, shift) == expected
    assert int(arith.requantize(np.array([x]), m, shift)[0]) == expected
    assert ref_requantize(x, m, shift) == expected


@settings(max_examples=400, deadline=None)
@given(
    x=st.integers(-(2**31), 2**31 - 1),
    m=st.integers(1 << 30, (1 << 31) - 1),
    shift=st.integers(-31, 0),
)
def test_requantize_matches_integer_definition(x, m, shift):
    got = int(arith.requantize(np.array([x], np.int64), m, shift)[0])
    assert got == ref_requantize(x, m, shift) == arith.requantize_scalar(x, m, shift)
    # Two roundings stay within one unit of the exact dyadic product.
    exact = Fraction(x * m, 2 ** (31 - shift))
    assert abs(got - exact) <= 1


@settings(max_examples=300, deadline=None)
@given(real=st.floats(min_value=1e-9, max_value=1000.0, allow_nan=False))
def test_quantize_multiplier_is_tflite_frexp(real):
    m, shift = arith.quantize_multiplier(real)
    assert (1 << 30) <= m < (1 << 31)
    approx = m * 2.0 ** (shift - 31)
    assert abs(approx - real) <= real * 2.0**-30
    b, c = arith.dyadic(m, shift)
    assert b == m and c == 31 - shift


@settings(max_examples=200, deadline=None)
@given(
    x=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=40),
    real=st.floats(min_value=1e-6, max_value=0.99),
)
def test_requantize_is_monotonic_and_vectorised(x, real):
    m, shift = arith.quantize_multiplier(real)
    xs = np.sort(np.array(x, np.int64))
    y = arith.requantize(xs, m, shift)
    assert np.all(np.diff(y) >= 0)
    assert [int(v) for v in y] == [arith.requantize_scalar(int(v), m, shift) for v in xs]


def test_per_channel_requantize_broadcasts_along_last_axis():
    acc = np.arange(-40, 40, dtype=np.int64).reshape(10, 8)
    mults = np.array([arith.quantize_multiplier(r)[0] for r in np.linspace(0.01, 0.9, 8)])
    shifts = np.array([arith.quantize_multiplier(r)[1] for r in np.linspace(0.01, 0.9, 8)])
    y = arith.requantize(acc, mults, shifts)
    for c in range(8):
        assert np.array_equal(y[:, c], arith.requantize(acc[:, c], int(mults[c]), int(shifts[c])))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 9, 25, 49, 64, 100, 196, 1000])
def test_rounded_average_equals_tflite_integer_division(n):
    max_abs = 128 * n
    acc = np.arange(-max_abs, max_abs + 1, dtype=np.int64)
    got = arith.rounded_average(acc, n, max_abs)
    # TFLite: acc > 0 ? (acc + n/2) / n : (acc - n/2) / n with C truncation
    want = np.where(acc > 0, (acc + n // 2) // n, -((-acc + n // 2) // n))
    assert np.array_equal(got, want)


def test_division_magic_refuses_nothing_in_range():
    for n in range(1, 300):
        b, k = arith.division_magic(n, 128 * n + n)
        t = np.arange(0, 128 * n + n + 1, dtype=np.int64)
        assert np.array_equal((t * b) >> k, t // n)


@settings(max_examples=100, deadline=None)
@given(vals=st.lists(st.integers(-8, 7), min_size=0, max_size=65))
def test_int4_packing_round_trips(vals):
    a = np.array(vals, np.int8)
    packed = pack_int4(a)
    assert packed.nbytes == (a.size + 1) // 2
    assert np.array_equal(unpack_int4(packed, a.shape), a)


def test_int4_packing_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_int4(np.array([8], np.int8))


def test_exact_int_matmul_float_path_equals_int64_path(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.integers(-255, 256, (64, 300))
    b = rng.integers(-127, 128, (300, 20))
    fast = arith.exact_int_matmul(a, b)
    assert np.array_equal(fast, a.astype(np.int64) @ b.astype(np.int64))


# ---- anchored to LiteRT itself --------------------------------------------------------


def _quant(details, i):
    q = details[i]["quantization_parameters"]
    return q["scales"], q["zero_points"]


def _conv_nhwc_same(x, zp, w, bias, stride):
    x = x.astype(np.int64) - zp
    n, h, wd, c = x.shape
    o, kh, kw, _ = w.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - wd, 0)
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    acc = np.zeros((n, oh, ow, o), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride, :]
            acc += arith.exact_int_matmul(patch.reshape(-1, c), w[:, i, j, :].T.astype(np.int64)).reshape(acc.shape)
    return acc + bias


def test_rule_reproduces_litert_builtin_kernels_on_official_int8_resnet8():
    """Every CONV_2D, ADD and FULLY_CONNECTED of the MLPerf Tiny int8 model, recomputed
    with edgekit's rule from the file's float32 scales, equals LiteRT's output tensor."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_path=str(DATA / "mlperf_tiny_resnet8_int8_reference.tflite"),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    it.allocate_tensors()
    det = {t["index"]: t for t in it.get_tensor_details()}
    x = np.load(DATA / "cifar10_test.npz")["x"][:40]
    convs = [
        (22, 0, 8, 3, 1),
        (23, 22, 9, 4, 1),
        (24, 23, 10, 17, 1),
        (26, 25, 11, 5, 2),
        (27, 26, 12, 18, 1),
        (28, 25, 13, 19, 2),
        (30, 29, 14, 6, 2),
        (31, 30, 15, 20, 1),
        (32, 29, 16, 21, 2),
    ]
    checked = 0
    for img in x:
        it.set_tensor(it.get_input_details()[0]["index"], (img[None].astype(np.int32) - 128).astype(np.int8))
        it.invoke()
        t = it.get_tensor
        for out, inp, w, b, stride in convs:
            si, zi = _quant(det, inp)
            sw, _ = _quant(det, w)
            so, zo = _quant(det, out)
            acc = _conv_nhwc_same(t(inp), int(zi[0]), t(w), t(b), stride)
            mult, shift = zip(
                *(arith.quantize_multiplier(float(np.float64(si[0]) * np.float64(s) / np.float64(so[0]))) for s in sw),
                strict=True,
            )
            y = np.clip(arith.requantize(acc, np.array(mult), np.array(shift)) + zo[0], -128, 127)
            assert np.array_equal(y, t(out)), f"conv output tensor {out}"
            checked += y.size
        for a, b, o in [(22, 24, 25), (28, 27, 29), (32, 31, 33)]:
            (sa,), (za,) = _quant(det, a)
            (sb,), (zb,) = _quant(det, b)
            (so,), (zo,) = _quant(det, o)
            twice = np.float64(np.float32(2 * max(np.float32(sa), np.float32(sb))))
            ma, ea = arith.quantize_multiplier(float(np.float64(sa) / twice))
            mb, eb = arith.quantize_multiplier(float(np.float64(sb) / twice))
            mo, eo = arith.quantize_multiplier(float(twice / ((1 << 20) * np.float64(so))))
            s = arith.requantize((t(a).astype(np.int64) - za) << 20, ma, ea) + arith.requantize(
                (t(b).astype(np.int64) - zb) << 20, mb, eb
            )
            y = np.clip(arith.requantize(s, mo, eo) + zo, -128, 127)
            assert np.array_equal(y, t(o)), f"add output tensor {o}"
            checked += y.size
        pooled = t(33).astype(np.int64).sum(axis=(1, 2))
        assert np.array_equal(np.clip(arith.rounded_average(pooled, 64, 128 * 64), -128, 127), t(34).reshape(1, -1))
        (si,), (zi,) = _quant(det, 35)
        (sw,), _ = _quant(det, 7)
        (so,), (zo,) = _quant(det, 36)
        acc = arith.exact_int_matmul(t(35).astype(np.int64) - zi, t(7).T.astype(np.int64)) + t(1)
        m, s = arith.quantize_multiplier(float(np.float64(si) * np.float64(sw) / np.float64(so)))
        assert np.array_equal(np.clip(arith.requantize(acc, m, s) + zo, -128, 127), t(36))
    assert checked > 1_000_000
