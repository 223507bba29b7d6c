"""A compiled TVM (Relax VM) library, run through the tvm Python package on the device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel, default_threads, run_in_batches


class TVMModel(LoadedModel):
    def __init__(self, path: Path, manifest: dict[str, Any], threads: int):
        try:
            import tvm
            from tvm import relax
        except ImportError as exc:
            raise AgentError("no TVM runtime on the device: pip install apache-tvm (aarch64 wheel)") from exc
        os.environ["TVM_NUM_THREADS"] = str(threads or default_threads(manifest))
        self.tvm = tvm
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), self.dev)
        self.entry = (manifest.get("extra") or {}).get("entry", "main")
        self.batch = int((manifest.get("extra") or {}).get("batch", 0) or 0)
        self.output_names = [o["name"] for o in manifest.get("outputs", [])] or ["output"]

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return run_in_batches(self._run_once, inputs, self.batch)

    def _run_once(self, inputs: dict[str, Any]) -> dict[str, Any]:
        args = [self.tvm.runtime.tensor(v, self.dev) for v in inputs.values()]
        res = self.vm[self.entry](*args)
        results = list(res) if not hasattr(res, "numpy") else [res]
        return {name: r.numpy() for name, r in zip(self.output_names, results, strict=False)}
