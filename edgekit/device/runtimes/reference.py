"""edgekit's numpy integer reference executor, shipped with the agent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import LoadedModel


class ReferenceModel(LoadedModel):
    per_layer = True

    def __init__(self, path: Path, manifest: dict[str, Any], threads: int):
        from edgekit.qmodel import load

        self.qm = load(path)

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.qm.run(inputs, integer=True)

    def run_timed_layers(self, inputs: dict[str, Any]) -> dict[str, float]:
        from edgekit.reference import OPS

        env: dict[str, Any] = dict(inputs)
        for c in self.qm.constants:
            if c in self.qm.tensors:
                env[c] = self.qm.constants[c]
        times: dict[str, float] = {}
        for node in self.qm.nodes:
            t0 = time.perf_counter_ns()
            env[node.outputs[0]] = OPS[node.op](self.qm, node, env)
            times[node.name] = (time.perf_counter_ns() - t0) / 1e6
        return times

    def intermediates(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.qm.run_all(inputs)
