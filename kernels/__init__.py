"""edgekit's integer kernel families as TE definitions (one file per family).

Every kernel takes int8 activations in NHWC layout and computes exactly what
``edgekit.reference`` computes: int32 accumulation, then the dyadic rescale of
``edgekit.quant.arith`` (``requant.requantize_expr``) with int64 intermediates, then the clamp.

- ``requant``   the fused requantization epilogue (and the standalone ``requantize`` op)
- ``conv2d``    NHWC conv2d, groups == 1 and grouped; packed-weight variant ``[O/b, KH, KW, I, b]``
- ``depthwise`` depthwise conv2d (groups == channels, any channel multiplier)
- ``dense``     fully connected on the last axis; packed-weight variant ``[O/16, K/4, 16, 4]``
- ``elementwise`` residual add (TFLite ADD; in int32 when compile-time bounds prove it exact, and
  composable into a conv epilogue: ``add_value``, ``requant.epilogue(then=...)``), mul, clamp, lut
- ``pool``      max and average pooling (division-free rounded average)
- ``int4``      4-bit weight packing (compile time, numpy) and unpacking (TE)
- ``layout``    pad, concat, transpose helpers
- ``tensorize`` ARM sdot / NEON and x86 VNNI tensor intrinsics (VNNI fixed for LLVM 22)
"""

from __future__ import annotations
