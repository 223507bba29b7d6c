"""onnxruntime on the device, with per-node times from its own profiler."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel


class OnnxModel(LoadedModel):
    def __init__(self, path: Path, manifest: dict[str, Any], threads: int):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise AgentError("no onnxruntime on the device: pip install onnxruntime") from exc
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.sess.get_inputs()]
        self.path, self.threads = path, threads

    per_layer = True
    layer_calls = 1  # one call runs the model several times itself
    layer_runs = 3

    def run_timed_layers(self, inputs: dict[str, Any]) -> dict[str, float]:
        """Per-node times from onnxruntime's own profiler (a separate profiling session)."""
        import tempfile

        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, "ort")
            if self.threads:
                opts.intra_op_num_threads = self.threads
            sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            feeds = dict(zip(self.names, inputs.values(), strict=False))
            for _ in range(1 + self.layer_runs):  # the first run warms up and is not counted
                sess.run(None, feeds)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
        times: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                if any(a <= e["ts"] <= b for a, b in runs):
                    name = e["name"][: -len("_kernel_time")]
                    times[name] = times.get(name, 0.0) + e.get("dur", 0) / 1000.0 / max(1, len(runs))
        return times

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        feeds = dict(zip(self.names, inputs.values(), strict=False))
        outs = self.sess.run(None, feeds)
        return {o.name: v for o, v in zip(self.sess.get_outputs(), outs, strict=True)}
