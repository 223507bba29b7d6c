"""``rpc://tracker:port/key`` (or ``rpc://host:port`` for a server without a tracker): TVM RPC.

No edgekit agent here: the device runs TVM's own RPC server, which can only load ``tvm``
artifacts. Deploy uploads the library into the RPC session's directory (TVM removes it when the
session ends, so there is no cache across sessions); profiling uses the server's
``time_evaluator`` (timed on the device); peak memory and intermediate tensors are not available.
``?timeout=S`` sets the RPC session timeout.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import ArtifactError, unpack_artifact
from edgekit.device.errors import DeviceConnectionError, DeviceError, DeviceTimeout


class RPCSession:
    """The subset of ``Session`` that TVM RPC can offer, with the same method names."""

    def __init__(self, url: str, remote: Any, timeout: float):
        self.url = url
        self.remote = remote
        self.timeout = timeout
        self.files: dict[str, tuple[str, dict[str, Any]]] = {}  # sha -> (remote file name, manifest)
        self.vm: Any = None
        self.batch = 0
        self.entry = "main"
        self.output_names: list[str] = []
        self.info = {"agent_version": None, "protocol": "tvm-rpc"}

    def __enter__(self) -> RPCSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.vm = None
        self.remote = None

    def probe(self) -> dict[str, Any]:
        dev = self.remote.cpu()
        return {
            "arch": "unknown (TVM RPC server)",
            "cpu": {},
            "runtimes": {"tvm": bool(dev.exist)},
            "agent_version": None,
            "protocol": "tvm-rpc",
            "mem_available_kib": None,
        }

    def has(self, sha256: str) -> bool:
        return sha256 in self.files

    def activate(self, sha256: str) -> None:
        pass

    def upload(self, data: bytes, sha256: str, progress=None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / "artifact.tar"
            art.write_bytes(data)
            try:
                manifest = unpack_artifact(art, Path(tmp) / "files")
            except (ArtifactError, tarfile.TarError) as exc:
                raise DeviceError(f"{self.url}: corrupt artifact ({exc})") from exc
            if manifest.get("runtime") != "tvm":
                msg = f"{self.url}: a TVM RPC server runs only 'tvm' artifacts, not {manifest['runtime']!r}"
                raise DeviceError(msg)
            name = f"{sha256[:16]}-{Path(manifest['model_file']).name}"
            try:
                self.remote.upload(str(Path(tmp) / "files" / manifest["model_file"]), target=name)
            except Exception as exc:  # TVM raises its own error types
                raise DeviceConnectionError(f"{self.url}: upload failed ({exc}); retry") from exc
        self.files[sha256] = (name, manifest)
        if progress:
            progress(len(data), len(data))

    def load(self, sha256: str, threads: int = 0) -> dict[str, Any]:
        from tvm import relax

        name, manifest = self.files[sha256]
        t0 = time.perf_counter()
        try:
            lib = self.remote.load_module(name)
            self.vm = relax.VirtualMachine(lib, self.remote.cpu())
        except Exception as exc:
            raise DeviceError(f"{self.url}: the RPC server could not load the library ({exc})") from exc
        self.entry = (manifest.get("extra") or {}).get("entry", "main")
        self.output_names = [o["name"] for o in manifest.get("outputs", [])] or ["output"]
        self.batch = int((manifest.get("extra") or {}).get("batch", 0) or 0)
        return {
            "load_ms": (time.perf_counter() - t0) * 1e3,
            "runtime": "tvm",
            "rss_before_kib": 0,
            "rss_after_kib": 0,
            "per_layer": False,
            "load_timed_on": "host",
        }

    def _args(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        import tvm

        dev = self.remote.cpu()
        return [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in inputs.values()]

    def run(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> tuple[dict[str, np.ndarray], float]:
        if self.vm is None:
            raise DeviceError("no model loaded")
        from edgekit.device.runtimes import run_in_batches

        t0 = time.perf_counter()
        outs = run_in_batches(self._run_once, inputs, self.batch)
        return outs, (time.perf_counter() - t0) * 1e3

    def _run_once(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            res = self.vm[self.entry](*self._args(inputs))
        except Exception as exc:
            raise DeviceConnectionError(f"{self.url}: run failed ({exc})") from exc
        results = [res] if hasattr(res, "numpy") else list(res)
        return {n: r.numpy() for n, r in zip(self.output_names, results, strict=False)}

    def profile(self, inputs: dict[str, np.ndarray], runs: int, warmup: int, timeout: float | None = None) -> dict:
        if self.vm is None:
            raise DeviceError("no model loaded")
        args = self._args(inputs)
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.vm[self.entry](*args)
        warmup_ms = (time.perf_counter() - t0) * 1e3
        start = time.monotonic()
        try:
            timer = self.vm.time_evaluator(self.entry, self.remote.cpu(), number=1, repeat=runs, min_repeat_ms=0)
            result = timer(*args)
        except Exception as exc:
            raise DeviceConnectionError(f"{self.url}: time_evaluator failed ({exc})") from exc
        return {
            "latencies_ms": [float(r) * 1e3 for r in result.results],
            "warmup_ms": warmup_ms,
            "layers_ms": {},
            "peak_rss_kib": None,
            "window": [start, time.monotonic()],
        }

    def intermediates(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise DeviceError("a TVM RPC server cannot return intermediate tensors; validate a 'reference' artifact")


def open_rpc(url: str, parts: Any, query: dict[str, str], timeout: float) -> RPCSession:
    from tvm import rpc

    host, port = parts.hostname or "127.0.0.1", parts.port or 9190
    key = parts.path.strip("/")
    session_timeout = float(query.get("timeout", 0) or 0)
    try:
        if key:
            remote = rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=session_timeout)
        else:
            remote = rpc.connect(host, port, session_timeout=session_timeout)
    except TimeoutError as exc:
        raise DeviceTimeout(f"{url}: no TVM RPC answer within the timeout ({exc})") from exc
    except Exception as exc:  # TVM raises TVMError / RuntimeError subclasses
        how = (
            f"python -m tvm.exec.rpc_tracker --port {port}` and register the device's server with --tracker "
            f"and --key {key}"
            if key
            else f"python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}`"
        )
        raise DeviceConnectionError(
            f"{url}: cannot reach the TVM RPC {'tracker' if key else 'server'} at {host}:{port} ({exc}); start one "
            f"with `{how}"
        ) from exc
    return RPCSession(url, remote, timeout)
