"""LiteRT (ai-edge-litert) or tflite-runtime on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel


def interpreter_class():
    """LiteRT's Interpreter, or tflite-runtime's where only that exists."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise AgentError("no LiteRT on the device: pip install ai-edge-litert (or tflite-runtime)") from exc
    return Interpreter


class TFLiteModel(LoadedModel):
    def __init__(self, path: Path, manifest: dict[str, Any], threads: int):
        self.interp = interpreter_class()(model_path=str(path), num_threads=threads or None)
        self.interp.allocate_tensors()
        self.inputs = self.interp.get_input_details()
        self.outputs = self.interp.get_output_details()

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        values = list(inputs.values())
        batch = values[0].shape[0]
        outs: dict[str, list[Any]] = {d["name"]: [] for d in self.outputs}
        for i in range(batch):  # LiteRT models are usually compiled for batch 1
            for d, v in zip(self.inputs, values, strict=False):
                self.interp.set_tensor(d["index"], v[i : i + 1].astype(d["dtype"]))
            self.interp.invoke()
            for d in self.outputs:
                outs[d["name"]].append(self.interp.get_tensor(d["index"]))
        return {k: np.concatenate(v) for k, v in outs.items()}
