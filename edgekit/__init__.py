"""edgekit: integer-only quantization, TVM compilation and on-device validation."""

from __future__ import annotations

from edgekit.errors import EdgekitError, ModelFormatError, QuantizationError, UnsupportedOpsError
from edgekit.qmodel import QuantModel, load

__version__ = "0.1.0"


def quantize(model, calib, *, scheme: str = "dyadic", weight_bits: int | str = 8, **options) -> QuantModel:
    """Quantize a float model (ONNX path or loaded graph) with calibration data.

    ``calib``: a numpy array, a dict of arrays, a ``.npz`` path, or an iterable of batches.
    """
    from edgekit.quant.dyadic import quantize_model

    if scheme != "dyadic":
        raise EdgekitError(f"scheme {scheme!r} is not available for this model; use 'dyadic'")
    return quantize_model(model, calib, weight_bits=weight_bits, **options)


__all__ = [
    "EdgekitError",
    "ModelFormatError",
    "QuantizationError",
    "QuantModel",
    "UnsupportedOpsError",
    "__version__",
    "load",
    "quantize",
]
