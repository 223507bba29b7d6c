"""The integer linear layers of a ``QuantLM`` compiled through TVM (host, Raspberry Pi 4/5, any
``targets/*.toml``), with edgekit's own integer kernels, checked bit-exact against ``qlm``.

The seven linears of a decoder layer (q k v o gate up down, ~all of a decode step's MACs) and
optionally the lm_head become one TE primfunc each: an int8 x int8 GEMM over weights pre-packed
into the dot-product block layout (``kernels.tensorize.gemm_packed_acc``; tensorized with VNNI,
``sdot`` or NEON when the target has them, as ``edgekit.compile.lower`` does for CNN dense layers)
and a fused integer epilogue:

- q, k (dequantized in float by ``qlm`` for RoPE) and the lm_head: the exact accumulator
  ``(x - zp) @ W^T + bias`` (int32, or int64 where ``qlm.accumulator_bits`` says it may not fit);
- v, o, gate, up, down: the dyadic requantization ``kernels.requant.requantize_expr`` (the same
  SQRDMULH + rounding shift as ``edgekit.quant.arith.requantize``), plus the output zero point,
  clamped to the output's 8 or 16 bits (int8 / int16 result).

16-bit activations (by default h, the down projection's input, and final_in, the lm_head's) are
split into two int8 planes, ``x = 256 * hi + (lo + 128)`` with ``hi = x >> 8`` and ``lo = (x & 255) - 128``,
stacked as 2T rows of the same int8 GEMM (so the dot-product instructions still apply, and every
int32 partial sum is exact) and recombined in int64: ``256 * acc_hi + acc_lo`` plus a bias that
absorbs every constant (the zero point, the +128, and the VNNI +128 on unsigned activations).

Per-channel int4 weights are compiled as int8 values (as ``lower.py`` does for tensorized layers);
group-wise int4 through its exact int8 expansion (``QLinear.weight``), so weights take 8 bits in the
library either way.

The Relax ``main`` takes one int8 buffer ``[T, bytes]``: per layer attn_in | attn_out | mlp_in
(int8) | h (int16 little-endian bytes), then final_in (int16 bytes) with the head, and returns the
outputs in order (``LinearSpec`` list). One int8 input is what edgekit's C++ runner
(``edgekit/compile/runner.cc``) feeds, so the same library runs under qemu-user for aarch64 and
in-process on the host. ``verify_linears`` compares every output with ``qlm.int_linear`` /
``qlm.rescale_to`` on the same integers.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgekit.compile  # noqa: F401  (puts the top-level ``kernels`` package on the path in a checkout)
from edgekit.errors import EdgekitError
from edgekit.llm.qlm import LINEAR_INPUTS, ActQ, QLinear, QuantLM, accumulator_bits, int_linear, rescale_to
from edgekit.quant.arith import quantize_multiplier

LINEARS = tuple(LINEAR_INPUTS)
# the activation each linear's output is quantized to (None: the exact accumulator, rescaled later)
OUTPUTS = {"q": None, "k": None, "v": "v", "o": "o_out", "gate": "gate", "up": "up", "down": "down_out"}
# linear -> (input activation, output activation); the inputs are qlm's own table
WIRING = {k: (LINEAR_INPUTS[k], OUTPUTS[k]) for k in LINEARS}
INPUTS = tuple(dict.fromkeys(LINEAR_INPUTS.values()))


class LMCompileError(EdgekitError):
    """The model cannot be lowered, or the compiled linears differ from ``qlm``."""


@dataclass
class LinearSpec:
    """One compiled linear: where it sits, its quantization, its output."""

    name: str  # "3.gate" or "lm_head"
    lin: QLinear
    xq: ActQ  # input activation
    outq: ActQ | None  # requantized output, or None: the accumulator
    real: np.ndarray | None  # per-channel rescale factor (outq only)
    acc_dtype: str  # "int32" or "int64" for accumulator outputs

    @property
    def out_dtype(self) -> str:
        if self.outq is None:
            return self.acc_dtype
        return "int8" if self.outq.bits <= 8 else "int16" if self.outq.bits <= 16 else "int32"

    @property
    def input(self) -> str:
        """The activation it reads, as named in ``int_forward``'s trace: "3.mlp_in", "final_in"."""
        if self.name == "lm_head":
            return "final_in"
        layer, lin = self.name.split(".")
        return f"{layer}.{WIRING[lin][0]}"

    @property
    def out_features(self) -> int:
        return int(self.lin.weight.shape[0])

    def reference(self, x: np.ndarray) -> np.ndarray:
        """``qlm``'s integers for this linear (int_linear, then rescale_to where requantized)."""
        acc = int_linear(x, self.xq, self.lin)
        if self.outq is None:
            return acc.astype(self.acc_dtype)
        return rescale_to(acc, self.real, self.outq).astype(self.out_dtype)


def linear_specs(qm: QuantLM, layers: list[int] | None = None, head: bool = False) -> list[LinearSpec]:
    """The linears to compile, in the order ``main`` returns them."""
    layers = [0] if layers is None else list(layers)
    bits = accumulator_bits(qm)
    specs = []
    for i in layers:
        lw, a = qm.layers[i], qm.acts[i]
        for k in LINEARS:
            src, dst = WIRING[k]
            lin = lw[k]
            _check_linear(lin, f"{i}.{k}")
            outq = a[dst] if dst else None
            real = None if outq is None else np.asarray(a[src].scale * lin.w_scale / outq.scale, np.float64)
            specs.append(LinearSpec(f"{i}.{k}", lin, a[src], outq, real, _acc_dtype(bits[f"{i}.{k}"])))
    if head:
        _check_linear(qm.head, "lm_head")
        specs.append(LinearSpec("lm_head", qm.head, qm.gacts["final_in"], None, None, _acc_dtype(bits["lm_head"])))
    return specs


def _acc_dtype(bits: int) -> str:
    return "int32" if bits <= 32 else "int64"


def _check_linear(lin: QLinear, name: str) -> None:
    w = np.asarray(lin.weight)
    if w.ndim != 2 or np.asarray(lin.w_scale).shape != (w.shape[0],) or lin.bits not in (4, 8):
        raise LMCompileError(
            f"{name}: only per-output-channel int8/int4 weights lower to TVM here "
            f"(weight {w.shape}, scale {np.shape(lin.w_scale)}, {lin.bits} bits)"
        )


# ---- input buffer layout ---------------------------------------------------------------------------


def input_layout(qm: QuantLM, specs: list[LinearSpec]) -> list[tuple[str, ActQ, int, int]]:
    """(name, activation, byte offset, width) of every activation in ``main``'s int8 row buffer."""
    needed: list[tuple[str, ActQ]] = []
    for s in specs:
        key = s.input
        if key not in [n for n, _ in needed]:
            needed.append((key, s.xq))
    out, off = [], 0
    for name, aq in needed:
        if aq.bits > 16:
            raise LMCompileError(f"{name}: {aq.bits}-bit activations do not lower (8 or 16 bits)")
        width = int(_in_features(specs, name))
        nbytes = width * (1 if aq.bits <= 8 else 2)
        out.append((name, aq, off, width))
        off += nbytes
    return out


def _in_features(specs: list[LinearSpec], act: str) -> int:
    for s in specs:
        key = s.input
        if key == act:
            return int(s.lin.weight.shape[1])
    raise KeyError(act)


def pack_inputs(layout: list[tuple[str, ActQ, int, int]], acts: dict[str, np.ndarray]) -> np.ndarray:
    """The int8 ``[T, bytes]`` buffer from integer activations ({"0.attn_in": [T, K], ...})."""
    rows = []
    for name, aq, _, _ in layout:
        x = np.asarray(acts[name])
        if x.min() < aq.qmin or x.max() > aq.qmax:
            raise LMCompileError(f"{name}: values outside its {aq.bits}-bit range")
        rows.append(x.astype(np.int8) if aq.bits <= 8 else np.ascontiguousarray(x.astype("<i2")).view(np.int8))
    return np.ascontiguousarray(np.concatenate(rows, axis=1))


def random_inputs(layout: list[tuple[str, ActQ, int, int]], tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Integers spanning each activation's whole range (the accumulators' worst cases included)."""
    rng = np.random.default_rng(seed)
    acts = {}
    for name, aq, _, width in layout:
        acts[name] = rng.integers(aq.qmin, aq.qmax, size=(tokens, width), endpoint=True).astype(np.int32)
    return acts


# ---- TE ---------------------------------------------------------------------------------------------


def _linear_te(xbuf, wp, bias, m, shift, *, spec: LinearSpec, offset: int, tokens: int, act_dtype: str):
    """One linear as TE: slice (and split a 16-bit input into int8 planes), packed GEMM, epilogue."""
    from tvm import te, tirx

    from kernels.requant import c64, requantize_expr
    from kernels.tensorize import gemm_packed_acc

    k = int(spec.lin.weight.shape[1])
    o = spec.out_features
    nb = int(wp.shape[2])
    wide = spec.xq.bits > 8
    if wide:  # little-endian int16: low byte at 2j, high byte at 2j+1

        def plane(r, j):
            lo = xbuf[r % tokens, offset + 2 * (j)]
            hi = xbuf[r % tokens, offset + 2 * (j) + 1]
            lo_centered = (lo.astype("int32") & 255) - 128
            return tirx.Select(r < tokens, hi, lo_centered.astype("int8"))

        xs = te.compute((2 * tokens, k), plane, name="x_planes")
    else:
        xs = te.compute((tokens, k), lambda r, j: xbuf[r, offset + j], name="x_slice")
    acc = gemm_packed_acc(xs, wp, act_dtype)

    def value(i, j):
        a = acc[i, j // nb, j % nb].astype("int64")
        if wide:
            a = a * c64(256) + acc[i + tokens, j // nb, j % nb].astype("int64")
        return a + bias[j]

    if spec.outq is None:
        return te.compute((tokens, o), lambda i, j: value(i, j).astype(spec.acc_dtype), name="acc_out")
    lo, hi, zp = spec.outq.qmin, spec.outq.qmax, spec.outq.zero_point

    def requant(i, j):
        y = requantize_expr(value(i, j), m[j], shift[j]) + c64(zp)
        return tirx.Cast(spec.out_dtype, tirx.min(tirx.max(y, c64(lo)), c64(hi)))

    return te.compute((tokens, o), requant, name="requant_out")


def folded_bias(spec: LinearSpec, unsigned: bool) -> np.ndarray:
    """int64 bias absorbing the input zero point, the int16 split's +128 and VNNI's +128."""
    w = spec.lin.weight.astype(np.int64)
    sw = w.sum(axis=1)
    u = 128 if unsigned else 0
    zp = int(spec.xq.zero_point)
    if spec.xq.bits > 8:
        return spec.lin.bias.astype(np.int64) + (128 - zp - 257 * u) * sw
    return spec.lin.bias.astype(np.int64) - (zp + u) * sw


@dataclass
class LoweredLM:
    mod: Any
    specs: list[LinearSpec]
    layout: list[tuple[str, ActQ, int, int]]
    tokens: int
    intrin: str | None
    weight_bytes: int


def lower_linears(
    qm: QuantLM,
    *,
    layers: list[int] | None = None,
    head: bool = False,
    tokens: int = 1,
    target: Any = None,
    tensorize: bool = True,
) -> LoweredLM:
    """The Relax module: ``main(buf int8[T, bytes]) -> tuple`` of every linear's output."""
    from tvm import relax, s_tir

    from kernels import space as kspace
    from kernels import tensorize as ktz

    specs = linear_specs(qm, layers, head)
    layout = input_layout(qm, specs)
    offsets = {name: off for name, _, off, _ in layout}
    intrin = ktz.intrin_for(target) if (target is not None and tensorize) else None
    act_dtype, nb, kb = ktz.LAYOUTS[intrin] if intrin else ("int8", 16, 4)
    total = layout[-1][2] + layout[-1][3] * (1 if layout[-1][1].bits <= 8 else 2)
    bb = relax.BlockBuilder()
    buf = relax.Var("buf", relax.TensorType([tokens, total], "int8"))
    scheduled = []
    weight_bytes = 0
    with bb.function("main", [buf]):
        with bb.dataflow():
            outs = []
            for s in specs:
                key = s.input
                wp = ktz.pack_weight(s.lin.weight.astype(np.int8), nb, kb)
                weight_bytes += wp.nbytes
                bias = folded_bias(s, act_dtype == "uint8")
                if s.real is not None:
                    ms = [quantize_multiplier(float(r)) for r in np.ravel(s.real)]
                    m = np.array([a for a, _ in ms], np.int32)
                    sh = np.array([b for _, b in ms], np.int32)
                else:
                    m = sh = np.zeros(s.out_features, np.int32)
                hint = "lin_" + s.name.replace(".", "_")

                def fn(xt, wt, bt, mt, st, s=s, off=offsets[key]):
                    return _linear_te(xt, wt, bt, mt, st, spec=s, offset=off, tokens=tokens, act_dtype=act_dtype)

                y = bb.emit_te(
                    fn,
                    buf,
                    relax.const(wp),
                    relax.const(bias),
                    relax.const(m),
                    relax.const(sh),
                    primfunc_name_hint=hint,
                )
                scheduled.append(hint)
                outs.append(y)
            res = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(res)
    mod = bb.get()
    if intrin is not None:
        for gv in list(mod.functions.keys()):
            if gv.name_hint in scheduled:
                sch = s_tir.Schedule(mod[gv])
                kspace.apply_schedule(sch, "gemm", intrin, kspace.default_knobs(sch, "gemm", intrin))
                mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return LoweredLM(mod, specs, layout, tokens, intrin, weight_bytes)


# ---- build, run, verify ----------------------------------------------------------------------------


@dataclass
class CompiledLinears:
    lowered: LoweredLM
    spec: Any  # edgekit.compile.targets.TargetSpec
    so_path: Path
    seconds: float

    def run(
        self, acts: dict[str, np.ndarray] | list[dict[str, np.ndarray]], repeats: int = 0
    ) -> tuple[list[list[np.ndarray]], float | None]:
        """Run on this machine (host target) or under qemu-user (aarch64); per input, the outputs."""
        batches = [acts] if isinstance(acts, dict) else list(acts)
        bufs = [pack_inputs(self.lowered.layout, a) for a in batches]
        t = self.lowered.tokens
        specs = self.lowered.specs
        if self.spec.arch == platform.machine():
            import tvm
            from tvm import relax

            vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.so_path)), tvm.cpu())
            res = []
            for b in bufs:
                r = vm["main"](tvm.runtime.tensor(b))
                res.append([x.numpy() for x in r])
            median = None
            if repeats:
                f = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeats)
                median = float(np.median(f(tvm.runtime.tensor(bufs[0])).results)) * 1e6
            return res, median
        if self.spec.arch == "aarch64":
            from edgekit.compile import emulate

            shapes = [[t, s.out_features * np.dtype(s.out_dtype).itemsize] for s in specs]
            raw, median = emulate.run_aarch64(self.so_path, bufs, shapes, self.spec.qemu_cpu, repeats=repeats)
            return [[o.view(s.out_dtype) for o, s in zip(r, specs, strict=True)] for r in raw], median
        raise LMCompileError(f"cannot run {self.spec.arch} code on this {platform.machine()} machine")


def compile_linears(
    qm: QuantLM,
    target: str = "host",
    out: str | Path | None = None,
    *,
    layers: list[int] | None = None,
    head: bool = False,
    tokens: int = 1,
    tensorize: bool = True,
) -> CompiledLinears:
    """Lower and build for ``target`` (``targets/*.toml`` name); the library lands at ``out``
    (default: a temporary directory that lives as long as the process)."""
    from edgekit.compile.build import build_library
    from edgekit.compile.targets import get_target

    t0 = time.time()
    spec = get_target(target)
    spec.compiler()
    lowered = lower_linears(qm, layers=layers, head=head, tokens=tokens, target=spec.tvm_target(), tensorize=tensorize)
    so = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="edgekit-lmc-")) / "linears.so"
    build_library(None, spec, so, lowered.mod)
    return CompiledLinears(lowered, spec, so, time.time() - t0)


def verify_linears(compiled: CompiledLinears, inputs: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Compare every compiled linear with ``qlm``'s integers on ``inputs``; mismatches by linear."""
    got, _ = compiled.run(inputs)
    per: dict[str, int] = {}
    values = 0
    for acts, outs in zip(inputs, got, strict=True):
        for s, y in zip(compiled.lowered.specs, outs, strict=True):
            key = s.input
            ref = s.reference(np.asarray(acts[key]))
            if y.shape != ref.shape or y.dtype != ref.dtype:
                raise LMCompileError(f"{s.name}: compiled output {y.dtype}{y.shape}, qlm {ref.dtype}{ref.shape}")
            per[s.name] = per.get(s.name, 0) + int((y != ref).sum())
            values += ref.size
    how = "host" if compiled.spec.arch == platform.machine() else f"qemu-user QEMU_CPU={compiled.spec.qemu_cpu}"
    return {
        "target": compiled.spec.name,
        "how": how,
        "intrin": compiled.lowered.intrin,
        "inputs": len(inputs),
        "values": values,
        "mismatches": sum(per.values()),
        "by_linear": per,
    }


def trace_inputs(qm: QuantLM, ids: np.ndarray, layout: list[tuple[str, ActQ, int, int]]) -> dict[str, np.ndarray]:
    """The real integer activations of a prompt pass (``int_forward``'s trace, re-quantized exactly)."""
    from edgekit.llm.qlm import int_forward

    trace: dict[str, np.ndarray] = {}
    int_forward(qm, np.asarray(ids), trace=trace)
    return {name: aq.quantize(trace[name]) for name, aq, _, _ in layout}


# ---- a library for the device's LM runtime (no Relax VM, no Python TVM on the device) -------------------


def build_device_linears(qm: QuantLM, target: str, out_dir: str | Path, *, tensorize: bool = True) -> dict[str, Any]:
    """Every linear of ``qm`` (all layers and the lm_head) as one exported TIR function each, for the
    ``lm`` device runtime, which calls them through ``ctypes`` with only ``libtvm_runtime.so`` and
    ``libtvm_ffi.so`` on the device (``/opt/edgekit-tvm/lib``, as the ``tvm`` runtime's ``ek_runner``).

    Each function ``lin_<layer>_<name>`` / ``lin_head`` takes (x int8 [1, K] or the int16 row's bytes
    [1, 2K], packed weights, int64 folded bias, out [1, O]) and writes the exact accumulator
    ``(x - zp) @ W^T + bias`` (``qlm.int_linear`` of one token; rows are independent, so a prompt is
    computed row by row). Writes ``linears.so`` and ``linears.npz`` (weights, biases) in ``out_dir``;
    returns the table the runtime needs (in the artifact manifest's ``extra.tvm_linears``)."""
    import tvm
    from tvm import s_tir, te
    from tvm.support import cc as tcc

    from edgekit.compile.targets import get_target
    from kernels import space as kspace
    from kernels import tensorize as ktz

    t0 = time.time()
    spec = get_target(target)
    cxx = spec.compiler()
    ttarget = spec.tvm_target()
    intrin = ktz.intrin_for(ttarget) if tensorize else None
    act_dtype, nb, kb = ktz.LAYOUTS[intrin] if intrin else ("int8", 16, 4)
    specs = linear_specs(qm, list(range(qm.config.layers)), head=True)
    funcs, arrays, table = {}, {}, []
    for s in specs:
        acc = LinearSpec(s.name, s.lin, s.xq, None, None, s.acc_dtype)
        name = "lin_head" if s.name == "lm_head" else "lin_" + s.name.replace(".", "_")
        k = int(s.lin.weight.shape[1])
        xbytes = k * (2 if s.xq.bits > 8 else 1)
        wp = ktz.pack_weight(s.lin.weight.astype(np.int8), nb, kb)
        bias = folded_bias(acc, act_dtype == "uint8")
        x = te.placeholder((1, xbytes), "int8", name="x")
        w = te.placeholder(wp.shape, "int8", name="w")
        b = te.placeholder(bias.shape, "int64", name="b")
        out = _linear_te(x, w, b, None, None, spec=acc, offset=0, tokens=1, act_dtype=act_dtype)
        f = te.create_prim_func([x, w, b, out])
        if intrin is not None:
            sch = s_tir.Schedule(f)
            kspace.apply_schedule(sch, "gemm", intrin, kspace.default_knobs(sch, "gemm", intrin))
            f = sch.mod["main"]
        funcs[name] = f.with_attr("global_symbol", name)
        arrays[name + ".w"], arrays[name + ".b"] = wp, bias
        table.append(
            {
                "linear": s.name,
                "func": name,
                "in_bits": s.xq.bits,
                "in_bytes": xbytes,
                "out_features": s.out_features,
                "acc_dtype": s.acc_dtype,
            }
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        ex = tvm.compile(tvm.IRModule(funcs), ttarget)
        ex.export_library(
            str(out_dir / "linears.so"), fcompile=tcc.cross_compiler(cxx, options=["-s"]) if cxx else None
        )
    except Exception as exc:  # TVM raises its own error types
        raise LMCompileError(f"building the LM linears for {spec.name} failed: {exc}") from exc
    np.savez(out_dir / "linears.npz", **arrays)
    return {
        "library": "linears.so",
        "weights": "linears.npz",
        "target": spec.name,
        "arch": spec.arch,
        "intrin": intrin,
        "functions": table,
        "build_seconds": round(time.time() - t0, 1),
    }
