"""A compiled TVM (Relax VM) library run by ``ek_runner`` (``edgekit/compile/runner.cc``), which needs
only ``libtvm_runtime.so`` + ``libtvm_ffi.so`` on the device: no Python TVM package.

The runner is a child process kept for the life of the loaded model (``ek_runner --serve MODEL.so``):
it loads the library once and answers ``run`` / ``time`` / ``layers`` / ``stats`` over its
stdin/stdout, so profiling times repeated runs with the runner's own monotonic clock (no pipe or
Python cost inside the timings); per-kernel times and every kernel's output (for ``validate`` to
name the first layer that differs) come from the Relax VM's instrument hook.

Where the runner is looked for: ``$EDGEKIT_TVM_RUNNER``, ``ek_runner`` on ``PATH``, then
``/opt/edgekit-tvm/bin/ek_runner`` (the layout ``tools/emulated-pi up`` installs and
``python -m edgekit.compile.emulate --device-runtime DIR`` writes: ``bin/ek_runner`` with the runtime
libraries in ``lib/`` beside it). Without a runner the ``tvm`` runtime falls back to the tvm Python
package (``tvm_vm``) if the device has it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel, default_threads, run_in_batches

RUNNER_ENV = "EDGEKIT_TVM_RUNNER"
RUNNER_NAME = "ek_runner"
DEFAULT_PREFIX = Path("/opt/edgekit-tvm")

_DL_CODES = {"i": 0, "u": 1, "f": 2}  # DLPack type codes: kDLInt, kDLUInt, kDLFloat
_NP_KINDS = {v: k for k, v in _DL_CODES.items()}


def find_runner() -> Path | None:
    """The ``ek_runner`` binary on this device, or None."""
    env = os.environ.get(RUNNER_ENV)
    if env:
        return Path(env) if os.access(env, os.X_OK) else None
    found = shutil.which(RUNNER_NAME)
    if found:
        return Path(found)
    default = DEFAULT_PREFIX / "bin" / RUNNER_NAME
    return default if os.access(default, os.X_OK) else None


def TVMModel(path: Path, manifest: dict[str, Any], threads: int) -> LoadedModel:  # noqa: N802 (a class factory)
    """The ``tvm`` runtime: the C++ runner when the device has one, else the tvm Python package."""
    arch = (manifest.get("extra") or {}).get("arch")
    here = platform.machine()
    if arch and arch != here and not (arch == "x86_64" and here == "AMD64"):
        raise AgentError(f"the artifact was compiled for {arch}, this device is {here}: compile it for this device")
    runner = find_runner()
    if runner is not None:
        return RunnerModel(runner, path, manifest, threads)
    try:
        from edgekit.device.runtimes import tvm_vm

        return tvm_vm.TVMModel(path, manifest, threads)
    except AgentError as exc:
        raise AgentError(
            f"no TVM runtime on the device: install ek_runner and libtvm_runtime.so/libtvm_ffi.so under "
            f"{DEFAULT_PREFIX}/{{bin,lib}} (python -m edgekit.compile.emulate --device-runtime DIR builds them for "
            f"aarch64), set ${RUNNER_ENV}, or pip install apache-tvm ({exc})"
        ) from exc


class RunnerModel(LoadedModel):
    per_layer = True
    layer_calls = 1  # one call averages over layer_runs runs inside the runner
    layer_runs = 3

    def __init__(self, runner: Path, path: Path, manifest: dict[str, Any], threads: int):
        extra = manifest.get("extra") or {}
        self.batch = int(extra.get("batch", 0) or 0)
        self.input_names = [i["name"] for i in manifest.get("inputs", [])]
        self.output_names = [o["name"] for o in manifest.get("outputs", [])] or ["output"]
        env = dict(os.environ)
        env["TVM_NUM_THREADS"] = str(threads or default_threads(manifest))
        self._log = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [str(runner), "--serve", str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            raise AgentError(f"cannot start {runner}: {exc}") from exc
        head = self._line().split()
        if head[:1] != ["ready"]:
            self.close()
            raise AgentError(f"ek_runner could not load the library: {' '.join(head[1:]) or self._stderr()}")
        self.runner_load_ms = int(head[1]) / 1e6

    # -- the pipe
    def _stderr(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip().splitlines()
        return " / ".join(text[-3:]) or f"exit status {self.proc.poll()}"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise AgentError(f"ek_runner exited: {self._stderr()}")
        return line.decode().rstrip("\n")

    def _request(self, command: str, inputs: dict[str, Any] | None = None) -> list[str]:
        """Send a command (and tensors); the fields of its ``ok`` line."""
        import numpy as np

        assert self.proc.stdin is not None
        parts = [f"{command}{'' if inputs is None else f' {len(inputs)}'}\n".encode()]
        for a in self._ordered(inputs) if inputs is not None else []:
            a = np.ascontiguousarray(a)
            if a.dtype.kind not in _DL_CODES:
                raise AgentError(f"ek_runner takes integer or float tensors, not {a.dtype}")
            parts.append(
                f"T {_DL_CODES[a.dtype.kind]} {a.dtype.itemsize * 8} {a.ndim} {' '.join(map(str, a.shape))}\n".encode()
            )
            parts.append(a.tobytes())
        try:
            self.proc.stdin.write(b"".join(parts))
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise AgentError(f"ek_runner exited: {self._stderr()}") from exc
        fields = self._line().split(" ")
        if fields[0] != "ok":
            raise AgentError(f"ek_runner: {' '.join(fields[1:])}")
        return fields[1:]

    def _ordered(self, inputs: dict[str, Any]) -> list[Any]:
        if self.input_names and set(self.input_names) == set(inputs):
            return [inputs[n] for n in self.input_names]
        return list(inputs.values())

    def _read_tensor(self) -> Any:
        import numpy as np

        assert self.proc.stdout is not None
        head = self._line().split()
        code, bits, ndim = int(head[1]), int(head[2]), int(head[3])
        shape = [int(d) for d in head[4 : 4 + ndim]]
        dtype = np.dtype(f"{_NP_KINDS[code]}{bits // 8}")
        n = int(np.prod(shape)) * dtype.itemsize
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise AgentError(f"ek_runner exited mid-tensor: {self._stderr()}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    # -- LoadedModel
    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return run_in_batches(self._run_once, inputs, self.batch)

    def _run_once(self, inputs: dict[str, Any]) -> dict[str, Any]:
        n_out = int(self._request("run", inputs)[0])
        outs = [self._read_tensor() for _ in range(n_out)]
        names = self.output_names + [f"output{i}" for i in range(len(self.output_names), n_out)]
        return dict(zip(names, outs, strict=False))

    def timed_runs(self, inputs: dict[str, Any], runs: int, warmup: int) -> tuple[float, list[float]] | None:
        """(warm-up ms, per-run ms) timed inside the runner; None when the batch needs splitting."""
        n = next(iter(inputs.values())).shape[0]
        if self.batch and n != self.batch:
            return None
        fields = self._request(f"time {int(warmup)} {int(runs)}", inputs)
        return int(fields[0]) / 1e6, [int(t) / 1e6 for t in fields[1:]]

    def run_timed_layers(self, inputs: dict[str, Any]) -> dict[str, float]:
        """Mean ms per run of each kernel the VM calls (VM builtins summed into one entry)."""
        n = next(iter(inputs.values())).shape[0]
        if self.batch and n != self.batch:
            inputs = {k: v[: self.batch] for k, v in inputs.items()}
        count = int(self._request(f"layers {self.layer_runs}", inputs)[0])
        times: dict[str, float] = {}
        for _ in range(count):
            ns, _calls, name = self._line().split(" ", 2)
            key = "vm.builtin.* (allocation, shape checks)" if name.startswith("vm.builtin.") else name
            times[key] = times.get(key, 0.0) + float(ns) / 1e6
        return times

    def intermediates(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Every kernel's output of one run, by kernel name in call order (the host maps kernel names to
        the graph's tensors: ``edgekit.device.validate.kernel_outputs_by_tensor``)."""
        count = int(self._request("intermediates", inputs)[0])
        out: dict[str, Any] = {}
        for _ in range(count):
            name = self._line()
            key, k = name, 2
            while key in out:  # a kernel called twice
                key, k = f"{name}#{k}", k + 1
            out[key] = self._read_tensor()
        return out

    def extra_rss_kib(self, peak: bool) -> int:
        """The runner process's resident memory (peak or current), which the agent's own does not include."""
        try:
            fields = self._request("stats")
        except AgentError:
            return 0
        return int(fields[0] if peak else fields[1])

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None or proc.poll() is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        self.close()
