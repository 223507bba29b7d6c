"""Small language models (Llama architecture) and encoders, quantized MobileQuant-style to integers.

Entry points: ``export_lm`` / ``eval_lm`` (what ``edgekit export`` / ``edgekit eval`` route to),
``load_lm`` (``.ekq`` files with ``format: "edgekit.lm"``), ``generate`` (greedy, integer KV cache),
``export_onnx`` (ONNX QDQ). Heavy modules load lazily.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_lm", "eval_lm", "load_lm", "generate", "export_onnx", "load_model", "QuantLM"]


def __getattr__(name: str) -> Any:
    if name in ("export_lm", "eval_lm"):
        from edgekit.llm import api

        return getattr(api, name)
    if name in ("load_lm", "generate", "QuantLM"):
        from edgekit.llm import qlm

        return getattr(qlm, name)
    if name == "export_onnx":
        from edgekit.llm.onnx_export import export_onnx

        return export_onnx
    if name == "load_model":
        from edgekit.llm.model import load_model

        return load_model
    raise AttributeError(name)
