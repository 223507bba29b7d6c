"""A quantized language model (``.ekq`` with ``format: "edgekit.lm"``) generating on the device.

Greedy generation with the integer KV cache, through edgekit's own integer executor
(``edgekit.llm.qlm``, numpy only, shipped with the agent bundle): the device computes with the
same code the host reference runs, so its tokens must be identical.

Inputs: ``prompt_ids`` (int, ``[T]`` or ``[B, T]``) and optionally ``max_new_tokens`` (int, any
shape, first element; default: the manifest's ``extra.max_new_tokens``). Outputs: ``tokens``
(int32 ``[B, N]``, -1 after an end-of-sequence stop) and ``step_ms`` (float64 ``[B, N]``: the
device-clock time of the prefill pass that produced the first token, then of each decode step).
Per-"layer" times for ``edgekit profile`` are the prefill pass and the mean decode step.

When the artifact carries compiled linears (``extra.tvm_linears``: ``linears.so`` built by
``edgekit.llm.compile.build_device_linears`` for this device's architecture, ``linears.npz``), every
linear layer's integer matmul runs in those TVM kernels, called through ``ctypes`` with only
``libtvm_runtime.so``/``libtvm_ffi.so`` on the device (``$EDGEKIT_TVM_LIB``, ``/opt/edgekit-tvm/lib``, or
the tvm wheel's); the rest of the step is ``qlm.int_forward`` itself (given the kernels as its
``linear``), so the tokens stay those of the host reference.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel
from edgekit.device.runtimes.tvm_runner import DEFAULT_PREFIX

TVM_LIB_ENV = "EDGEKIT_TVM_LIB"
TVM_LIB_DIRS = (str(DEFAULT_PREFIX / "lib"),)  # where the tvm runtime (ek_runner) installs them too


class LMModel(LoadedModel):
    per_layer = True
    layer_calls = 1  # one generation gives a prefill and every decode step

    def __init__(self, path: Path, manifest: dict[str, Any], threads: int):
        try:
            from edgekit.llm import qlm
        except ImportError as exc:  # an agent bundle from before the LM runtime
            raise AgentError(f"this agent bundle cannot run language models ({exc}); reconnect to update it") from exc
        self.qlm = qlm
        self.qm = qlm.load_lm(path)
        extra = manifest.get("extra") or {}
        self.default_new = int(extra.get("max_new_tokens", 16))
        eos = extra.get("eos_token_id")
        self.eos = None if eos is None else int(eos)
        self.kernels: TVMLinears | None = None
        tl = extra.get("tvm_linears")
        if tl:
            self.kernels = TVMLinears(path.parent, tl, self.qm)

    def _linear(self, x: Any, xq: Any, lin: Any) -> Any:
        """A linear's integer accumulator: the compiled kernel when the artifact has one, else numpy."""
        fn = None if self.kernels is None else self.kernels.by_id.get(id(lin))
        return self.qlm.int_linear(x, xq, lin) if fn is None else self.kernels.call(fn, x)

    def _args(self, inputs: dict[str, Any]) -> tuple[Any, int]:
        import numpy as np

        if "prompt_ids" not in inputs:
            raise AgentError(f"a language model takes 'prompt_ids' (and 'max_new_tokens'), got {sorted(inputs)}")
        ids = np.asarray(inputs["prompt_ids"])
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise AgentError(f"prompt_ids must be integer [T] or [B, T] with T >= 1, got {ids.dtype} {ids.shape}")
        ids = ids.reshape(-1, ids.shape[-1]).astype(np.int64)
        vocab = self.qm.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise AgentError(f"prompt_ids outside the vocabulary [0, {vocab})")
        n = inputs.get("max_new_tokens")
        n = self.default_new if n is None else int(np.asarray(n).reshape(-1)[0])
        if not 0 <= n <= 1 << 16:
            raise AgentError(f"max_new_tokens must be in [0, 65536], got {n}")
        return ids, n

    def _generate(self, prompt: Any, n: int) -> tuple[list[int], list[float]]:
        """``qlm.generate`` (greedy, integer KV cache), with each step timed on the device clock."""
        import numpy as np

        qlm = self.qlm
        cache = qlm.KVCache(self.qm.config.layers)
        out: list[int] = []
        steps: list[float] = []
        if n == 0:
            return out, steps
        t0 = time.perf_counter_ns()
        lg = qlm.int_forward(self.qm, prompt, cache, linear=self._linear)
        for i in range(n):
            nxt = int(np.argmax(lg[-1]))
            steps.append((time.perf_counter_ns() - t0) / 1e6)
            out.append(nxt)
            if (self.eos is not None and nxt == self.eos) or i == n - 1:
                break
            t0 = time.perf_counter_ns()
            lg = qlm.int_forward(self.qm, np.array([nxt]), cache, linear=self._linear)
        return out, steps

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        ids, n = self._args(inputs)
        tokens = np.full((len(ids), n), -1, np.int32)
        step_ms = np.zeros((len(ids), n), np.float64)
        calls0 = self.kernels.calls if self.kernels is not None else 0
        for b, prompt in enumerate(ids):
            out, steps = self._generate(prompt, n)
            tokens[b, : len(out)] = out
            step_ms[b, : len(steps)] = steps
        outs = {"tokens": tokens, "step_ms": step_ms}
        if self.kernels is not None:  # proof that the compiled kernels, not numpy, computed the linears
            outs["tvm_kernel_calls"] = np.array([self.kernels.calls - calls0], np.int64)
        return outs

    def run_timed_layers(self, inputs: dict[str, Any]) -> dict[str, float]:
        ids, n = self._args(inputs)
        _, steps = self._generate(ids[0], max(n, 2))
        decode = steps[1:]
        return {
            f"prefill ({ids.shape[1]} tokens, first token)": steps[0],
            "decode step (1 token, mean)": sum(decode) / len(decode),
        }

    def intermediates(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Every named activation of the prompt pass (dequantized, as ``int_forward``'s trace)."""
        ids, _ = self._args(inputs)
        trace: dict[str, Any] = {}
        self.qlm.int_forward(self.qm, ids[0], trace=trace, linear=self._linear)
        return trace


# ---- compiled TVM linears through ctypes ------------------------------------------------------------


def _tvm_lib_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get(TVM_LIB_ENV, "").split(os.pathsep) if d]
    dirs += [Path(d) for d in TVM_LIB_DIRS]
    import importlib.util

    for pkg, sub in (("tvm", "lib"), ("tvm_ffi", "lib")):  # a host with the tvm wheel
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.origin:
            dirs.append(Path(spec.origin).parent / sub)
    return dirs


def _find_lib(name: str) -> Path:
    for d in _tvm_lib_dirs():
        if (d / name).is_file():
            return d / name
    raise AgentError(
        f"the artifact's compiled linears need {name} on the device: put libtvm_runtime.so and "
        f"libtvm_ffi.so in {TVM_LIB_DIRS[0]} (python -m edgekit.compile.emulate --device-runtime DIR "
        f"builds them for aarch64) or set ${TVM_LIB_ENV}"
    )


class TVMLinears:
    """The artifact's ``linears.so``: one exported TVM function per linear, called with the TVM FFI
    C calling convention (``TVMFFISafeCallType``: DLTensor pointers in ``TVMFFIAny`` slots)."""

    def __init__(self, folder: Path, table: dict[str, Any], qm: Any):
        import ctypes

        import numpy as np

        arch = table.get("arch")
        if arch and arch != platform.machine():
            raise AgentError(
                f"the compiled linears are for {arch}, this device is {platform.machine()}: "
                f"pack the LM artifact for this device's target"
            )
        glob = ctypes.RTLD_GLOBAL
        ffi = ctypes.CDLL(str(_find_lib("libtvm_ffi.so")), mode=glob)
        rt = ctypes.CDLL(str(_find_lib("libtvm_runtime.so")), mode=glob)
        self.so = ctypes.CDLL(str(folder / table["library"]), mode=glob)
        for var, fn in (
            ("__TVMBackendAllocWorkspace", "TVMBackendAllocWorkspace"),
            ("__TVMBackendFreeWorkspace", "TVMBackendFreeWorkspace"),
        ):
            with contextlib.suppress(ValueError):  # only present when a kernel allocates a workspace
                ctypes.c_void_p.in_dll(self.so, var).value = ctypes.cast(getattr(rt, fn), ctypes.c_void_p).value
        self._ffi, self._rt, self.np, self.ct = ffi, rt, np, ctypes
        weights = np.load(folder / table["weights"])
        lins = {f"{i}.{k}": v for i, lw in enumerate(qm.layers) for k, v in lw.items() if hasattr(v, "bias")}
        lins["lm_head"] = qm.head
        safe = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_Any), ctypes.c_int32, ctypes.POINTER(_Any)
        )
        self.by_id: dict[int, dict[str, Any]] = {}
        for e in table["functions"]:
            fn = safe(ctypes.cast(getattr(self.so, "__tvm_ffi_" + e["func"]), ctypes.c_void_p).value)
            x = np.zeros((1, e["in_bytes"]), np.int8)
            out = np.zeros((1, e["out_features"]), e["acc_dtype"])
            # TVM's kernels assume 64-byte aligned buffers (aligned vector loads)
            arrays = [_aligned(a) for a in (x, weights[e["func"] + ".w"], weights[e["func"] + ".b"], out)]
            x, out = arrays[0], arrays[3]
            dls = [_dltensor(a) for a in arrays]
            args = (_Any * 4)(*[_Any(7, 0, ctypes.addressof(d)) for d, _ in dls])  # kTVMFFIDLTensorPtr
            entry = {
                "name": e["func"],
                "fn": fn,
                "x": x,
                "out": out,
                "arrays": arrays,
                "dls": dls,
                "args": args,
                "wide": e["in_bits"] > 8,
            }
            self.by_id[id(lins[e["linear"]])] = entry
        self.calls = 0

    def call(self, e: dict[str, Any], x: Any) -> Any:
        """``qlm.int_linear(x, xq, lin)`` (int64 [T, O]) computed one row at a time by the kernel."""
        np = self.np
        x = np.asarray(x)
        rows = []
        for r in range(x.shape[0]):
            if e["wide"]:
                e["x"][0] = x[r].astype("<i2").view(np.int8)
            else:
                e["x"][0] = x[r]
            result = _Any(0, 0, 0)
            if e["fn"](None, e["args"], 4, self.ct.byref(result)) != 0:
                raise AgentError(f"the compiled kernel {e['name']} failed on the device")
            rows.append(e["out"][0].astype(np.int64))
            self.calls += 1
        return np.stack(rows)


def _aligned(a: Any, align: int = 64) -> Any:
    """A C-contiguous copy of ``a`` whose data starts on an ``align``-byte boundary."""
    import numpy as np

    a = np.asarray(a)
    raw = np.empty(a.nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    out = raw[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _dltensor(a: Any) -> tuple[Any, Any]:
    import ctypes

    shape = (ctypes.c_int64 * a.ndim)(*a.shape)
    code = {"i": 0, "u": 1, "f": 2}[a.dtype.kind]
    t = _DLTensor(a.ctypes.data, _DLDevice(1, 0), a.ndim, _DLDataType(code, a.dtype.itemsize * 8, 1), shape, None, 0)
    return t, shape


def _ctypes_structs():
    import ctypes

    class DLDevice(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

    class DLDataType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class DLTensor(ctypes.Structure):
        _fields_ = [
            ("data", ctypes.c_void_p),
            ("device", DLDevice),
            ("ndim", ctypes.c_int32),
            ("dtype", DLDataType),
            ("shape", ctypes.POINTER(ctypes.c_int64)),
            ("strides", ctypes.POINTER(ctypes.c_int64)),
            ("byte_offset", ctypes.c_uint64),
        ]

    class Any(ctypes.Structure):  # TVMFFIAny: type index, 4 bytes padding, an 8-byte value
        _fields_ = [("type_index", ctypes.c_int32), ("zero_padding", ctypes.c_uint32), ("v_ptr", ctypes.c_void_p)]

    return DLDevice, DLDataType, DLTensor, Any


_DLDevice, _DLDataType, _DLTensor, _Any = _ctypes_structs()
