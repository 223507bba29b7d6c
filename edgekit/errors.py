"""Errors edgekit raises on bad input: each says what is wrong and what to do."""

from __future__ import annotations


class EdgekitError(Exception):
    """Base class: the CLI prints these as one message, without a traceback."""


class ModelFormatError(EdgekitError):
    """A model file is missing, corrupt, or of another kind."""


class UnsupportedOpsError(EdgekitError):
    """The model uses operators edgekit cannot handle; lists every one of them."""

    def __init__(self, unsupported: list[tuple[str, str]], context: str = "edgekit"):
        self.unsupported = unsupported
        by_type: dict[str, list[str]] = {}
        for op, node in unsupported:
            by_type.setdefault(op, []).append(node)
        lines = [f"{context} does not support {len(by_type)} operator type(s) in this model:"]
        for op, nodes in sorted(by_type.items()):
            shown = ", ".join(repr(n) for n in nodes[:8])
            more = f" (+{len(nodes) - 8} more)" if len(nodes) > 8 else ""
            lines.append(f"  {op}: {len(nodes)} node(s): {shown}{more}")
        super().__init__("\n".join(lines))


class QuantizationError(EdgekitError):
    """The model cannot be quantized as asked (e.g. an accumulator could overflow)."""


class CalibrationError(EdgekitError):
    """Calibration data are missing, empty or do not fit the model's inputs."""
