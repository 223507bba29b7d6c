"""Device runtimes, one file each; the agent picks one by the artifact manifest's ``runtime``.

Modules are imported only when an artifact needs them, so a device without (say) onnxruntime
still serves the other runtimes.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel, run_in_batches

# manifest runtime -> "module:class" under edgekit.device.runtimes
RUNTIMES = {
    "reference": "reference:ReferenceModel",
    "tflite": "litert:TFLiteModel",
    "onnxruntime": "onnxrt:OnnxModel",
    "tvm": "tvm_runner:TVMModel",  # ek_runner (TVM runtime only) if installed, else the tvm Python package
    "lm": "lm:LMModel",
}


def runtime_class(name: str) -> Any:
    """The LoadedModel subclass for a manifest runtime name."""
    if name not in RUNTIMES:
        raise AgentError(f"unknown runtime {name!r} in the artifact; this agent knows {sorted(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(f"edgekit.device.runtimes.{module}"), cls)


__all__ = ["RUNTIMES", "AgentError", "LoadedModel", "run_in_batches", "runtime_class"]
