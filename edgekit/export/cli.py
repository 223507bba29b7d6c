"""CLI side of the exports: ``edgekit bundle`` and ``export_model`` for ``edgekit export``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.qmodel import QuantModel


def export_model(qm: QuantModel, fmt: str, out: str | Path, target: str | None = None) -> dict[str, Any]:
    """Export ``qm`` as ``fmt`` (tflite | onnx | bundle) to ``out``; ``target`` (ethos-u55-128, ...)
    compiles the TFLite file with Vela. Returns a JSON-able summary (with Vela's estimate)."""
    fmt = (fmt or "").lower().lstrip(".")
    if target:
        if fmt not in ("tflite", "ekq", ""):
            raise EdgekitError(f"--target {target} compiles a TFLite model for an NPU; use --format tflite, not {fmt}")
        from edgekit.export.vela import export_vela

        return export_vela(qm, out, target=target)
    if fmt == "tflite":
        from edgekit.export.tflite import export_tflite

        return export_tflite(qm, out)
    if fmt == "onnx":
        from edgekit.export.onnx_qdq import export_onnx

        return export_onnx(qm, out)
    if fmt == "bundle":
        from edgekit.export.bundle import write_bundle

        return write_bundle(qm, out)
    raise EdgekitError(f"unknown export format {fmt!r}: choose tflite, onnx or bundle (or ekq)")


def cmd_bundle(args: argparse.Namespace) -> int:
    from edgekit.export.bundle import RUNTIMES, write_bundle
    from edgekit.qmodel import load

    qm = load(args.model)
    runtimes = tuple(r.strip() for r in args.runtime.split(",")) if args.runtime else RUNTIMES
    mean = [float(v) for v in args.mean.split(",")] if args.mean else None
    std = [float(v) for v in args.std.split(",")] if args.std else None
    res = write_bundle(qm, args.output, runtimes=runtimes, labels=args.labels, mean=mean, std=std, as_zip=args.zip)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for rt, b in res["bundles"].items():
            print(f"{rt}: {b['path']} ({', '.join(b['files'])})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``bundle`` to the main CLI."""
    p = subparsers.add_parser("bundle", help="write mobile app bundles (model + metadata.json + Kotlin/Swift snippets)")
    p.add_argument("model", help="quantized model (.ekq)")
    p.add_argument("-o", "--output", required=True, help="output folder (one sub-folder or zip per runtime)")
    p.add_argument("--runtime", help="comma list of litert,onnxruntime (default: both)")
    p.add_argument("--labels", help="class labels: a preset (cifar10), a text file (one per line) or a comma list")
    p.add_argument("--mean", help="per-channel mean subtracted from raw pixels (default 0)")
    p.add_argument("--std", help="per-channel std dividing raw pixels (default 1: the model takes raw 0..255)")
    p.add_argument("--zip", action="store_true", help="write one .zip per runtime instead of folders")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bundle)
