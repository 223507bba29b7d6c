"""Tensorized int8 GEMM/dense: x86 VNNI (``vpdpbusd``, u8 x s8), ARM ``sdot`` (+dotprod) and a
NEON fallback, over weights pre-packed at compile time into the block layout the intrinsic
reads: ``[N/nb, K/kb, nb, kb]`` (VNNI 16x4, sdot 4x4).

The VNNI intrinsic TVM ships (``dot_16x4_vnni``) fails LLVM 22's verifier ("Call parameter type
does not match": LLVM 22's ``vpdpbusd.512`` takes ``<64 x i8>`` operands, TVM passes ``<16 x i32>``).
``VNNI_INTRIN`` is the same description with the operands reinterpreted as u8x64 / i8x64.

VNNI multiplies unsigned activations: the kernel feeds ``x + 128`` (uint8) and the bias absorbs
``-(zin + 128) * sum(w)`` instead of ``-zin * sum(w)`` (``fold_zero_point(..., unsigned=True)``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from kernels.conv2d import PLAIN_MAP
from kernels.requant import epilogue


def _register_arm_intrinsics() -> None:
    """Register TVM's ARM intrinsics (sdot, NEON) without the package ``__init__``, which also
    imports the CUDA, ROCm and Hexagon intrinsics: 20 s of import on an idle machine, over a minute
    under load. A later full ``import tvm.s_tir.tensor_intrin`` (MetaSchedule does one) still runs
    and finds ``arm_cpu`` already imported, so nothing is registered twice."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        importlib.import_module(name + ".arm_cpu")
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover
        return
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    try:
        importlib.import_module(name + ".arm_cpu")
    finally:
        del sys.modules[name]


_register_arm_intrinsics()

VNNI_INTRIN = "edgekit_dot_16x4_vnni"
SDOT_INTRIN = "dot_4x4_i8i8s32_sdot"
NEON_INTRIN = "dot_4x4_i8i8s32_neon"


@T.prim_func(s_tir=True)
def _vnni_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _vnni_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # one expression, no named temporaries: a temporary becomes a buffer, and a buffer inside a parallel
    # loop is a TVMBackendAllocWorkspace call per iteration (measured: ~1 us per conv kernel call)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


TensorIntrin.register(VNNI_INTRIN, _vnni_desc, _vnni_impl, override=True)


@T.prim_func(s_tir=True)
def _vnni_s8_desc(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(T.cast(T.cast(A[vk], "int32") + 128, "uint8"), "int32") * T.cast(
                        B[vi, vk], "int32"
                    )


@T.prim_func(s_tir=True)
def _vnni_s8_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # int8 activations read as they are; x + 128 as u8 is x with its top bit flipped: one XOR per broadcast
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(
                T.broadcast(
                    T.bitwise_xor(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), T.int32(-2139062144)), 16
                ),
                dtype="uint8x64",
            ),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


# VNNI over int8 activations shifted inside the intrinsic: the 1x1 convolutions without padding read
# their input in place instead of through a shifted copy (-2139062144 is 0x80808080)
VNNI_S8_INTRIN = "edgekit_dot_16x4_vnni_s8"
TensorIntrin.register(VNNI_S8_INTRIN, _vnni_s8_desc, _vnni_s8_impl, override=True)

# intrinsic -> (activation dtype, nb, kb)
LAYOUTS = {VNNI_INTRIN: ("uint8", 16, 4), SDOT_INTRIN: ("int8", 4, 4), NEON_INTRIN: ("int8", 4, 4)}


def intrin_for(target) -> str | None:
    """The dot-product intrinsic a TVM target supports, or None."""
    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    keys = [str(k) for k in t.keys]
    attrs = {str(k): v for k, v in t.attrs.items()}
    if "arm_cpu" in keys:
        return SDOT_INTRIN if bool(attrs.get("feature.has_dotprod", False)) else NEON_INTRIN
    mcpu = str(attrs.get("mcpu", ""))
    mattr = [str(m) for m in attrs.get("mattr", [])]
    if "+avx512vnni" in mattr or (mcpu and tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], t)):
        return VNNI_INTRIN
    return None


def pack_weight(weight: np.ndarray, nb: int, kb: int) -> np.ndarray:
    """[N, K] int8 -> [ceil(N/nb), ceil(K/kb), nb, kb], zero padded."""
    n, k = weight.shape
    pn, pk = -(-n // nb), -(-k // kb)
    wp = np.zeros((pn * nb, pk * kb), np.int8)
    wp[:n, :k] = weight
    return np.ascontiguousarray(wp.reshape(pn, nb, pk, kb).transpose(0, 2, 1, 3))


def fold_zero_point(bias: np.ndarray, weight: np.ndarray, zin: int, unsigned: bool) -> np.ndarray:
    """bias - (zin [+ 128 for u8 activations]) * sum_k w, as int32."""
    z = int(zin) + (128 if unsigned else 0)
    b = bias.astype(np.int64) - z * weight.astype(np.int64).sum(axis=1)
    return b.astype(np.int32)


def gemm_packed_acc(x: te.Tensor, wp: te.Tensor, act_dtype: str) -> te.Tensor:
    """int32 [M, N/nb, nb] = x [M, K] (int8) . packed weights; u8 activations are x + 128."""
    m, k = (int(d) for d in x.shape)
    pn, pk, nb, kb = (int(d) for d in wp.shape)
    kp = pk * kb

    def act(i, kk):
        v = x[i, kk]
        if act_dtype == "uint8":
            v = (v.astype("int32") + 128).astype("uint8")
        return v if kp == k else tvm.tirx.if_then_else(kk < k, v, tvm.tirx.const(0, act_dtype))

    xa = te.compute((m, kp), act, name="act")
    ko = te.reduce_axis((0, pk), "ko")
    ki = te.reduce_axis((0, kb), "ki")
    return te.compute(
        (m, pn, nb),
        lambda i, jo, ji: te.sum(
            xa[i, ko * kb + ki].astype("int32") * wp[jo, ko, ji, ki].astype("int32"), axis=[ko, ki]
        ),
        name="gemm_acc",
    )


def dense_tensorized(
    x: te.Tensor,
    wp: te.Tensor,
    bias: te.Tensor,
    m: te.Tensor,
    shift: te.Tensor,
    *,
    out_features: int,
    act_dtype: str,
    zout: int,
    act_min: int,
    act_max: int,
) -> te.Tensor:
    """Dense + requantize over packed weights (bias folded with ``fold_zero_point``)."""
    acc4 = gemm_packed_acc(x, wp, act_dtype)
    nb = int(wp.shape[2])
    acc = te.compute((int(x.shape[0]), out_features), lambda i, j: acc4[i, j // nb, j % nb], name="acc")
    return epilogue(acc, bias, m, shift, zout, act_min, act_max)


def schedule_gemm(sch, intrin: str, threads: int = 1, row_block: int = 4, col_block: int = 1) -> None:
    """Tensorize the ``gemm_acc`` block of ``sch`` with ``intrin``: a register tile of ``row_block`` rows x
    ``col_block`` blocks of ``nb`` columns accumulates across the whole K loop (the intrinsic does
    nb x kb); the outer loop is parallel when ``threads`` > 1; the [M, N] view of the accumulators is
    inlined. Blocks that do not divide M / N/nb fall back to the largest divisor below them."""
    blk = sch.get_sblock("gemm_acc")
    i, jo, ji, ko, ki = sch.get_loops(blk)
    rb = _divisor(_extent(sch, i), row_block)
    cb = _divisor(_extent(sch, jo), col_block)
    io, ii = sch.split(i, [None, rb])
    joo, joi = sch.split(jo, [None, cb])
    sch.reorder(io, joo, ko, ii, joi, ji, ki)
    if threads > 1:
        outer = sch.fuse(io, joo) if _extent(sch, io) < threads * 2 else io
        sch.parallel(outer)
    ko = sch.get_loops(blk)[-5]
    sch.decompose_reduction(blk, ko)
    sch.tensorize(sch.get_loops(blk)[-2], intrin)
    sch.unroll(ii)
    sch.unroll(joi)
    try:
        sch.compute_inline(sch.get_sblock("acc"))
    except Exception:  # noqa: BLE001 - not every caller has the reshape stage
        pass


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit``."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _vector_split(sch, loop, widths=(64, 32, 16, 8, 4)):
    """Vectorize ``loop`` by the widest of ``widths`` dividing its extent (returns the outer loop)."""
    ext = _extent(sch, loop)
    for v in widths:
        if ext % v == 0 and ext >= v:
            if ext == v:
                sch.vectorize(loop)
                return None
            outer, inner = sch.split(loop, [None, v])
            sch.vectorize(inner)
            return outer
    return loop


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - TVM raises its own error type
        return False


def schedule_rowwise(sch, block, parallel_axes: int = 2, parallel: bool = True) -> None:
    """A spatial block over [N, H, W, C]-like loops: the first ``parallel_axes`` loops fused (and
    parallel when ``parallel``), the innermost vectorized."""
    loops = sch.get_loops(block)
    if len(loops) > parallel_axes:
        outer = sch.fuse(*loops[:parallel_axes]) if parallel_axes > 1 else loops[0]
        if parallel:
            sch.parallel(outer)
    _vector_split(sch, sch.get_loops(block)[-1])


def schedule_conv(
    sch,
    intrin: str,
    ow_block: int = 8,
    oc_block: int = 2,
    oh_block: int = 1,
    window_outer: bool = True,
    parallel: bool = True,
) -> None:
    """Tensorize ``kernels.conv2d.conv2d_dot``: row blocks (n, oh / ``oh_block``), parallel when ``parallel``
    (the padded, shifted input copy stays serial: one thread-pool launch per kernel); per register
    tile of ``oh_block`` rows x ``ow_block`` output columns x ``oc_block`` channel blocks the accumulators
    stay in registers across the (kh, kw, I/kb) reduction (window loops outside the channel blocks when
    ``window_outer``), the intrinsic does (nb x kb); the requantization epilogue runs per tile while the
    accumulators are in cache. Blocks that do not divide their extent fall back to the largest divisor."""
    act = sch.get_sblock("act")
    if PLAIN_MAP in sch.get(act).annotations:  # no padding: read the input in place
        sch.compute_inline(act)
        act = None
        intrin = VNNI_S8_INTRIN if intrin == VNNI_INTRIN else intrin
    blk = sch.get_sblock("conv_acc")
    b, i, j, ob, oi, rh, rw, rco, rci = sch.get_loops(blk)
    io, ih = sch.split(i, [None, _divisor(_extent(sch, i), oh_block)])
    jo, jw = sch.split(j, [None, _divisor(_extent(sch, j), ow_block)])
    obo, obi = sch.split(ob, [None, _divisor(_extent(sch, ob), oc_block)])
    red = (rh, rw, rco) if window_outer else (rco, rh, rw)
    sch.reorder(b, io, jo, obo, *red, ih, jw, obi, oi, rci)
    row = sch.fuse(b, io)
    if parallel:
        sch.parallel(row)
    sch.compute_inline(sch.get_sblock("acc"))
    req = sch.get_sblock("requant")
    sch.reverse_compute_at(req, jo)
    inner = sch.get_loops(req)[2:]  # below (row, jo): [rows,] [pixels,] channels (unit loops are absent)
    cho = _vector_split(sch, inner[-1], (16, 8, 4)) if inner else None
    if cho is not None and len(inner) >= 2:  # channel blocks outside the pixels: constants stay in registers
        sch.reorder(cho, inner[0])
    sch.decompose_reduction(blk, red[0])
    sch.tensorize(oi, intrin)
    sch.unroll(ih)
    sch.unroll(jw)
    sch.unroll(obi)
    if act is not None:
        schedule_rowwise(sch, act, parallel=False)
    if _has_block(sch, "w_unpack"):
        unp = sch.get_sblock("w_unpack")
        *outer, oi, ri = sch.get_loops(unp)
        e = sch.fuse(oi, ri)
        half = _extent(sch, e) // 2
        _, ei = sch.split(e, [2, half])  # one nibble per half tile (``int4.pack_int4_tiles``)
        sch.vectorize(ei)
