"""Integer arithmetic of edgekit: the one rounding rule every path shares.

A real-valued rescale ``r`` is stored as a dyadic number ``M / 2**(31 - shift)``
with ``M`` an int32 in ``[2**30, 2**31)`` (0 for r == 0) and ``shift`` in
``[-31, 30]``. It is applied to an int32 ``x`` as

    y = RSHR(SQRDMULH(x * 2**max(shift, 0), M), max(-shift, 0))

    SQRDMULH(a, M) = (a * M + 2**30) >> 31          (rounding doubling high mul)
    RSHR(v, n)     = (v + 2**(n - 1)) >> n, n > 0     (rounding right shift)
                   = v,                   n == 0

where ``>>`` is an arithmetic shift (floor). Both roundings are half toward
+infinity. This is the ARM NEON ``sqrdmulh`` + ``srshr`` sequence, which keeps
every lane 32 bits wide; it is what LiteRT's built-in CONV_2D, FULLY_CONNECTED,
ADD and AVERAGE_POOL_2D kernels compute (measured: 0 mismatches on every
intermediate tensor of the MLPerf Tiny int8 ResNet-8, where gemmlowp's
half-away-from-zero rule gave 15,806), and what edgekit's TVM kernels emit.

``quantize_multiplier`` derives ``(M, shift)`` from a real number exactly as
TFLite's ``QuantizeMultiplier`` does (frexp, round half away from zero), so a
model whose float32 scales are written to a .tflite file gets the very same
integers on the device.

Only numpy is imported here: this module ships to devices with the agent.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(M, shift) with real ~= M * 2**(shift - 31), as TFLite's QuantizeMultiplier."""
    if real < 0:
        raise ValueError(f"rescale factors must be non-negative, got {real}")
    if real == 0.0:
        return 0, 0
    frac, shift = math.frexp(real)
    m = math.floor(frac * (1 << 31) + 0.5)  # std::round: half away from zero (m > 0)
    if m == (1 << 31):
        m //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"rescale factor {real} is too large for an int32 dyadic multiplier")
    return int(m), int(shift)


def dyadic(m: int, shift: int) -> tuple[int, int]:
    """The (b, c) of the dyadic number b / 2**c that (M, shift) stands for."""
    return m, 31 - shift


def rounding_rshift(v: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """RSHR: (v + 2**(n-1)) >> n, half toward +inf; n may be 0 or per-element."""
    v = np.asarray(v, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    half = np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0)
    return np.right_shift(v + half, n)


def sqrdmulh(a: np.ndarray, m: int | np.ndarray) -> np.ndarray:
    """SQRDMULH on int32 operands: (a * m + 2**30) >> 31, saturated to int32."""
    a = np.asarray(a, dtype=np.int64)
    m = np.asarray(m, dtype=np.int64)
    out = np.right_shift(a * m + (1 << 30), 31)
    return np.clip(out, INT32_MIN, INT32_MAX)


def requantize(x: np.ndarray, m: int | np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """Apply the dyadic rescale (M, shift) to int32 values; M and shift may be per-channel
    (broadcast along the last axis). Returns int64 (callers clamp and cast)."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return rounding_rshift(sqrdmulh(np.left_shift(x, left), m), right)


def requantize_scalar(x: int, m: int, shift: int) -> int:
    """Pure-Python requantize of one value (for hand-checked tests and docs)."""
    a = x << max(shift, 0)
    h = (a * m + (1 << 30)) >> 31
    h = min(max(h, INT32_MIN), INT32_MAX)
    n = max(-shift, 0)
    return h if n == 0 else (h + (1 << (n - 1))) >> n


def round_half_away(x: np.ndarray) -> np.ndarray:
    """std::round semantics, used only at quantize time (weights, biases, inputs)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


# ---- division-free exact integer division, for average pooling ------------------------


def division_magic(n: int, max_dividend: int) -> tuple[int, int]:
    """(b, k) such that (t * b) >> k == t // n for every 0 <= t <= max_dividend.

    With e = b*n - 2**k in [0, n), the error of t*b/2**k over t/n is t*e/(n*2**k); it stays
    below the distance 1/n to the next integer multiple whenever max_dividend * e < 2**k.
    """
    if n <= 0:
        raise ValueError("divisor must be positive")
    k = max(max_dividend, 1).bit_length() + n.bit_length() + 1
    b = -(-(1 << k) // n)
    e = b * n - (1 << k)
    assert max_dividend * e < (1 << k), "division magic bound violated"
    return b, k


def rounded_average(acc: np.ndarray, count: int | np.ndarray, max_abs: int) -> np.ndarray:
    """TFLite's integer average: (acc +- count//2) / count truncated toward zero,
    i.e. round half away from zero, computed with a multiply and a shift only.

    ``count`` may vary per element (pool windows clipped at padded borders).
    """
    acc = np.asarray(acc, dtype=np.int64)
    counts = np.unique(np.asarray(count))
    mag = np.abs(acc)
    out = np.zeros_like(acc)
    count_arr = np.broadcast_to(np.asarray(count, dtype=np.int64), acc.shape)
    for n in counts:
        n = int(n)
        b, k = division_magic(n, max_abs + n // 2)
        sel = count_arr == n
        q = np.right_shift((mag[sel] + n // 2) * b, k)
        out[sel] = np.where(acc[sel] < 0, -q, q)
    return out


def saturate(x: np.ndarray, lo: int, hi: int, dtype=np.int8) -> np.ndarray:
    return np.clip(x, lo, hi).astype(dtype)


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def exact_int_matmul(a: np.ndarray, b: np.ndarray, bound: int | None = None) -> np.ndarray:
    """Integer matrix product a @ b, exact, as int64.

    BLAS has no integer GEMM, so when the worst-case magnitude of every partial sum is
    below 2**53 (always true for int8/int4 operands with K < 2**37) the product is carried
    in float64, where every such integer and every partial sum is represented exactly;
    otherwise it falls back to int64 arithmetic. The result is identical either way.
    ``bound`` (max |a| * max |b| * K) may be given when the caller knows it, to skip a scan.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if bound is None:
        bound = int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0)) * a.shape[-1]
    if bound < (1 << 53):
        return np.matmul(a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))
