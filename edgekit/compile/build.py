"""``compile_model``: QuantModel -> TVM Relax VM library -> edgekit artifact (.tar)."""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import pack_artifact
from edgekit.errors import EdgekitError
from edgekit.qmodel import QuantModel
from edgekit.qmodel import load as load_qmodel

from . import emulate
from .lower import Lowered, lower
from .targets import TargetSpec, get_target

Progress = Callable[[str], None]


class CompileError(EdgekitError):
    """Compilation failed, or the compiled model is not bit-exact with the reference."""


@dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float


def _quiet(_: str) -> None:
    pass


def build_library(lowered: Lowered, spec: TargetSpec, so_path: Path, mod=None) -> None:
    """tvm.compile the (possibly tuned) module for ``spec`` and link it with the target's compiler."""
    import tvm
    from tvm.support import cc as tcc

    target = spec.tvm_target()
    try:
        ex = tvm.compile(mod if mod is not None else lowered.mod, target)
    except Exception as exc:  # TVM raises its own error types
        raise CompileError(f"TVM could not compile the model for {spec.name}: {exc}") from exc
    compiler = spec.compiler()
    flags = ["-s", *[str(f) for f in spec.toolchain.get("link_flags", [])]]  # -s: no debug info in the artifact
    fcompile = tcc.cross_compiler(compiler, options=flags) if compiler else None
    try:
        ex.export_library(str(so_path), fcompile=fcompile)
    except Exception as exc:
        raise CompileError(f"linking the library with {compiler or 'the default compiler'} failed: {exc}") from exc


def quantize_input(qm: QuantModel, x: np.ndarray) -> np.ndarray:
    """Float model input -> the int8 tensor the compiled function takes (the graph's quantize op,
    run on the host as the reference executor does)."""
    from edgekit.reference import op_quantize

    name = qm.inputs[0]
    node = next((n for n in qm.nodes if n.op == "quantize" and n.inputs[0] == name), None)
    if node is None or np.asarray(x).dtype == np.int8:
        return np.asarray(x, dtype=np.int8)
    return op_quantize(qm, node, {name: np.asarray(x, dtype=np.float32)})


def sample_inputs(lowered: Lowered, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-128, 128, size=lowered.inputs[0]["shape"]).astype(np.int8) for _ in range(n)]


def run_library(
    so_path: Path, spec: TargetSpec, xs: list[np.ndarray], out_shapes: list[list[int]]
) -> list[list[np.ndarray]]:
    """Run a compiled library on int8 inputs: in-process on the host, under qemu-user for aarch64.
    Returns, per input, the list of int8 outputs."""
    if spec.arch == platform.machine() or (spec.arch == "x86_64" and platform.machine() == "AMD64"):
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(tvm.runtime.load_module(str(so_path)), tvm.cpu())
        res = []
        for x in xs:
            r = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
            items = [r] if hasattr(r, "numpy") else list(r)
            res.append([t.numpy() for t in items])
        return res
    if spec.arch == "aarch64":
        return emulate.run_aarch64(so_path, xs, out_shapes, spec.qemu_cpu)[0]
    raise emulate.EmulationUnavailable(f"cannot run {spec.arch} code on this {platform.machine()} machine")


def can_run(spec: TargetSpec) -> bool:
    if spec.is_android:
        return False  # bionic binaries: needs a device (or an emulator with adbd)
    if spec.arch == platform.machine():
        return True
    return spec.arch == "aarch64" and emulate.available()


def verify_library(
    so_path: Path, spec: TargetSpec, qm: QuantModel, lowered: Lowered, inputs: list[np.ndarray]
) -> dict[str, Any]:
    """Compare the compiled library with the reference executor on ``inputs`` (int8)."""
    out_shapes = [o["shape"] for o in lowered.outputs]
    mism, total = 0, 0
    for x, got in zip(inputs, run_library(so_path, spec, inputs, out_shapes), strict=True):
        ref = qm.run(x, integer=True)
        for o, g in zip(qm.outputs, got, strict=True):
            mism += int((np.asarray(g) != ref[o.name]).sum())
            total += g.size
    how = "host" if spec.arch == platform.machine() else f"qemu-user QEMU_CPU={spec.qemu_cpu}"
    return {"how": how, "inputs": len(inputs), "values": total, "mismatches": mism}


def compile_model(
    qm: QuantModel | str | Path,
    target: str | TargetSpec = "host",
    out: str | Path | None = None,
    *,
    tune: bool = False,
    trials: int = 64,
    batch: int = 1,
    targets_dir: str | Path | None = None,
    tuning_dir: str | Path | None = None,
    rpc: dict[str, Any] | None = None,
    verify: bool | str = "auto",
    verify_inputs: list[np.ndarray] | int = 2,
    tensorize: bool = True,
    tune_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> CompileResult:
    """Compile ``qm`` for ``target`` into an artifact at ``out``.

    ``tune``: run MetaSchedule (``trials`` total) with the persistent database of the target
    (``~/.cache/edgekit/tuning/<target>`` unless ``tuning_dir``); ``rpc``: measure on a device via a
    TVM RPC tracker ({"tracker": "host:port", "key": ..., "timeout": s}). ``verify``: check
    bit-exactness against the reference (True: required, "auto": when this machine can run the
    code, natively or under qemu; False: skip). ``tensorize``: use the dot-product intrinsic
    kernels (VNNI / sdot / NEON) where the target has them.
    """
    t0 = time.time()
    say = progress or _quiet
    if not isinstance(qm, QuantModel):
        qm = load_qmodel(qm)
    spec = get_target(target, targets_dir)
    out = Path(out) if out is not None else Path(f"{qm.name}.{spec.name}.tar")
    spec.compiler()  # fail early, with a message, when the toolchain is missing
    say(f"lowering {qm.name} ({len(qm.nodes)} nodes) for {spec.name}")
    lowered = lower(qm, batch, spec.tvm_target(), tensorize=tensorize)
    import tvm

    tuned_info: dict[str, Any] = {"tuned": False}
    mod = None
    with tempfile.TemporaryDirectory(prefix="edgekit-compile-") as td:
        so_path = Path(td) / "model.so"
        if tune:
            from .tune import tune_module

            mod, tuned_info = tune_module(
                lowered, spec, trials=trials, tuning_dir=tuning_dir, rpc=rpc, progress=say, **(tune_options or {})
            )
        say(f"building for {spec.name} ({spec.tvm_dict().get('mcpu', spec.tvm.get('mtriple', ''))})")
        build_library(lowered, spec, so_path, mod)
        verified: dict[str, Any] | None = None
        want = verify is True or (verify == "auto" and can_run(spec))
        if want:
            inputs = sample_inputs(lowered, verify_inputs) if isinstance(verify_inputs, int) else verify_inputs
            say(f"checking bit-exactness against the reference on {len(inputs)} input(s)")
            verified = verify_library(so_path, spec, qm, lowered, inputs)
            if verified["mismatches"] and mod is not None:
                say(
                    f"tuned build differs from the reference ({verified['mismatches']} values): "
                    "falling back to the untuned kernels"
                )
                tuned_info = {"tuned": False, "tuning_rejected": f"{verified['mismatches']} mismatching values"}
                build_library(lowered, spec, so_path, None)
                verified = verify_library(so_path, spec, qm, lowered, inputs)
            if verified["mismatches"]:
                raise CompileError(
                    f"the compiled model differs from the reference executor in "
                    f"{verified['mismatches']} of {verified['values']} values on {spec.name}; "
                    "this is a compiler bug: report it with the model"
                )
        ref_path = Path(td) / "reference.ekq"
        qm.save(ref_path)
        manifest = {
            "runtime": "tvm",
            "model_file": "model.so",
            "target": spec.name,
            "model_hash": qm.content_hash(),
            "inputs": lowered.inputs,
            "outputs": lowered.outputs,
            "extra": {
                "entry": "main",
                "input_quantized": True,
                "batch": batch,
                "threads": spec.threads,
                "threads_env": "TVM_NUM_THREADS",
                "tvm_version": tvm.__version__,
                "tvm_target": spec.tvm_dict(),
                "arch": spec.arch,
                "qemu_cpu": spec.qemu_cpu,
                "runtime_libraries": list(spec.runtime.get("libraries", [])),
                "runtime_provided_by": spec.runtime.get("provided_by", ""),
                "weight_bytes": lowered.weight_bytes,
                "weight_bits": sorted({int(n.attrs.get("weight_bits", 8)) for n in qm.nodes if "weight" in n.params}),
                "kernels": sorted(set(lowered.kernels.values())),
                "verified": verified,
                "compile_seconds": round(time.time() - t0, 2),
                **tuned_info,
            },
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        pack_artifact(out, manifest, {"model.so": so_path, "reference.ekq": ref_path})
    say(f"wrote {out}")
    return CompileResult(out, manifest, time.time() - t0)
