"""Hand schedules for the kernels that are not tensorized: depthwise conv2d (channels vectorized,
a tile of output columns accumulated in registers), pooling and the elementwise / data-movement
kernels (rows parallel, innermost axis vectorized). ``kernels.space`` picks one by kernel kind,
with its knobs.
"""

from __future__ import annotations

from kernels.tensorize import _divisor, _extent, _has_block, _vector_split, schedule_rowwise

ELEMENTWISE = {"add", "mul", "requantize", "concat", "pad", "transpose", "lut", "clamp"}
# below this many elements a data-movement kernel runs on one thread: a thread-pool launch costs about
# 1 us, as much as the whole kernel (ResNet-8 on 2 threads was slower than on 1 with every loop parallel)
PARALLEL_MIN_ELEMENTS = 1 << 17


def _vec_width(n: int, widths=(32, 16, 8, 4)) -> int:
    return next((v for v in widths if n % v == 0), 1)


def schedule_depthwise(sch, ow_block: int = 8, parallel: bool = True) -> None:
    """Depthwise conv: rows parallel (when ``parallel``); per tile of ``ow_block`` columns x one channel
    vector the int32 accumulators stay in registers across the (kh, kw) window; the epilogue follows per
    tile."""
    acc = sch.get_sblock("dw_acc")
    b, i, j, oc, rh, rw = sch.get_loops(acc)
    jo, ji = sch.split(j, [None, _divisor(_extent(sch, j), ow_block)])
    oco, oci = sch.split(oc, [None, _vec_width(_extent(sch, oc))])
    sch.reorder(b, i, jo, oco, rh, rw, ji, oci)
    row = sch.fuse(b, i)
    if parallel:
        sch.parallel(row)
    req = sch.get_sblock("requant")
    sch.reverse_compute_at(req, oco)
    own = sch.get_loops(req)[3:]  # below (row, jo, oco): empty when the tile is 1 x 1
    if own:
        sch.vectorize(own[-1])
    sch.unroll(ji)
    sch.vectorize(oci)  # before decompose_reduction: TVM refuses to vectorize an init-less update block
    sch.decompose_reduction(acc, rh)
    for stage in ("pad", "w_unpack"):
        if _has_block(sch, stage):
            schedule_rowwise(sch, sch.get_sblock(stage), parallel=False)


def schedule_pool(sch) -> None:
    """Max / average pooling: the window reduction with the channels innermost (vectorized)."""
    for name in ("maxpool", "pool_sum"):
        if not _has_block(sch, name):
            continue
        blk = sch.get_sblock(name)
        b, i, j, ch, rh, rw = sch.get_loops(blk)
        sch.reorder(rh, rw, ch)
        _vector_split(sch, ch)
        sch.decompose_reduction(blk, rh)
    for name in ("avgpool", "clamp", "pad"):
        if _has_block(sch, name):
            blk = sch.get_sblock(name)
            big = _elements(sch, blk) >= PARALLEL_MIN_ELEMENTS
            schedule_rowwise(sch, blk, parallel=big)


def _elements(sch, block) -> int:
    n = 1
    for lp in sch.get_loops(block):
        n *= _extent(sch, lp)
    return n


def schedule_elementwise(sch, name: str) -> None:
    """One spatial block (after inlining helpers): all loops fused, split into (parallel, vector)."""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    n = _extent(sch, fused)
    v = _vec_width(n, (64, 32, 16, 8, 4))
    big = n >= PARALLEL_MIN_ELEMENTS
    if v == 1:
        if big:
            sch.parallel(fused)
        return
    outer, inner = sch.split(fused, [None, v])
    sch.vectorize(inner)
    if big and _extent(sch, outer) >= 16:
        sch.parallel(outer)
