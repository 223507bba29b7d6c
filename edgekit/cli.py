"""The ``edgekit`` command line: parses, calls the Python API, prints a table or JSON."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.data import read_npz
from edgekit.errors import EdgekitError

# Subcommands owned by other stages register themselves through these modules.
PLUGINS = ("edgekit.export.cli", "edgekit.compile.cli", "edgekit.device.cli", "edgekit.mixed.cli")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    data = read_npz(path)
    if "x" not in data:
        raise EdgekitError(f"{path}: a data file holds 'x' (inputs) and optionally 'y' (labels); found {sorted(data)}")
    return data


# ---- export ---------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    src = Path(args.model)
    if src.suffix.lower() == ".gguf" or args.scheme in ("mobilequant", "rtn", "smoothquant"):
        llm = importlib.import_module("edgekit.llm")
        summary = llm.export_lm(
            str(src),
            scheme=args.scheme,
            weight_bits=int(args.weight_bits),
            act_bits=args.act_bits,
            calib_text=args.calib_text,
            out=args.output,
        )
        _print_json(summary) if args.json else print(f"wrote {args.output}")
        return 0
    if args.scheme != "dyadic":
        raise EdgekitError(f"scheme {args.scheme!r} applies to language models (.gguf); use --scheme dyadic")
    if not args.calib:
        raise EdgekitError("--calib CALIB.npz is required: edgekit calibrates activation ranges on your data")
    calib = load_npz(args.calib)["x"]
    t0 = time.perf_counter()
    if args.weight_bits == "mixed":
        mixed = importlib.import_module("edgekit.mixed")
        qm, report = mixed.export_mixed(src, calib, args)
    else:
        from edgekit.quant.dyadic import quantize_model

        qm = quantize_model(
            src, calib, weight_bits=int(args.weight_bits), observer=args.observer, progress=not args.json
        )
        report = {}
    out = Path(args.output)
    fmt = args.format or ("ekq" if out.suffix in (".ekq", "") else out.suffix.lstrip("."))
    summary: dict[str, Any] = {"output": str(out), "format": fmt, "seconds": None, **report}
    if fmt == "ekq" and not args.target:
        qm.save(out)
    else:
        exporter = importlib.import_module("edgekit.export.cli")
        summary.update(exporter.export_model(qm, fmt, out, target=args.target))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["weight_bytes"] = qm.weight_bytes()
    if args.json:
        _print_json(summary)
    else:
        written = summary.get("path", out)
        print(f"wrote {written} ({fmt}, {summary['weight_bytes']:.0f} weight bytes) in {summary['seconds']} s")
        if "vela" in summary:
            print(summary["vela"].get("verdict", ""))
    return 0


# ---- eval / run -----------------------------------------------------------------------
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def _onnx_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run an ONNX model with onnxruntime on ``x`` cast to the model's input dtype."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = ONNX_DTYPES.get(inp.type)
    if dtype is None:
        raise EdgekitError(f"{path}: input {inp.name!r} has type {inp.type}; edgekit evaluates float/uint8/int8 inputs")
    if dtype != np.float32 and x.dtype != dtype and not np.array_equal(x, x.astype(dtype)):
        raise EdgekitError(f"{path}: the model takes {inp.type} and the data do not fit that type without change")
    outs = [sess.run(None, {inp.name: x[i : i + 500].astype(dtype)}) for i in range(0, len(x), 500)]
    return {o.name: np.concatenate([b[k] for b in outs]) for k, o in enumerate(sess.get_outputs())}


def _tflite_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run a .tflite with LiteRT's built-in kernels; float data are quantized as its input says."""
    from edgekit.export.tflite import make_interpreter, run_tflite

    it = make_interpreter(path)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if inp["dtype"] in (np.int8, np.uint8) and x.dtype not in (np.int8,):
        scale, zp = inp["quantization"]
        lo, hi = np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max
        x = np.clip(np.round(x.astype(np.float32) / np.float32(scale)) + zp, lo, hi).astype(inp["dtype"])
    return {out["name"]: run_tflite(path, x)}


def _model_outputs(path: Path, x: np.ndarray, integer: bool = False) -> tuple[dict[str, np.ndarray], Any]:
    if path.suffix.lower() == ".onnx":
        return _onnx_run(path, x), None
    if path.suffix.lower() == ".tflite":
        return _tflite_run(path, x), None
    from edgekit.qmodel import load

    qm = load(path)
    return qm.run(x.astype(np.float32) if x.dtype != np.int8 else x, integer=integer), qm


def cmd_eval(args: argparse.Namespace) -> int:
    path = Path(args.model)
    if args.text:
        llm = importlib.import_module("edgekit.llm")
        result = llm.eval_lm(str(path), args.text, args.tokens)
        _print_json(result) if args.json else print(result)
        return 0
    if not args.data:
        raise EdgekitError("--data DATA.npz is required (or --text FILE for a language model)")
    data = load_npz(args.data)
    x = data["x"][: args.limit] if args.limit else data["x"]
    t0 = time.perf_counter()
    outs, qm = _model_outputs(path, x)
    seconds = time.perf_counter() - t0
    first = next(iter(outs.values()))
    result: dict[str, Any] = {
        "model": str(path),
        "n": int(len(x)),
        "seconds": round(seconds, 3),
        "ms_per_sample": round(1000 * seconds / max(len(x), 1), 4),
    }
    if "y" in data:
        y = data["y"][: len(x)]
        result["top1"] = float((first.argmax(-1) == y).mean())
    if qm is not None:
        result["integer_only"] = integer_only(qm)
        src = Path(qm.provenance.get("source", {}).get("path", ""))
        if src.suffix == ".onnx" and src.exists():
            ref = next(iter(_onnx_run(src, x).values()))
            result["agreement_with_float"] = float((ref.argmax(-1) == first.argmax(-1)).mean())
            if "y" in data:
                result["float_top1"] = float((ref.argmax(-1) == data["y"][: len(x)]).mean())
        else:
            result["agreement_with_float"] = None
            result["note"] = "float source model not found; agreement not measured"
    if args.json:
        _print_json(result)
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    data = load_npz(args.data)
    outs, _ = _model_outputs(Path(args.model), data["x"], integer=True)
    np.savez(args.output, **outs)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in outs.items()))
    return 0


# ---- inspect --------------------------------------------------------------------------
INTEGER_OPS = {
    "conv2d",
    "dense",
    "add",
    "mul",
    "requantize",
    "maxpool",
    "avgpool",
    "concat",
    "pad",
    "reshape",
    "transpose",
    "lut",
    "clamp",
}


def integer_only(qm) -> bool:
    """True when every node after the input quantize is integer and every tensor in between is int8."""
    for n in qm.nodes:
        if n.op == "quantize":
            if n.inputs[0] not in qm.inputs:
                return False
            continue
        if n.op not in INTEGER_OPS:
            return False
        if any(qm.tensors[t].dtype != "int8" for t in n.inputs + n.outputs):
            return False
    return True


def inspect_model(qm) -> dict[str, Any]:
    layers = []
    bops = 0
    for n in qm.nodes:
        entry: dict[str, Any] = {
            "name": n.name,
            "op": n.op,
            "input_dtypes": [qm.tensors[t].dtype for t in n.inputs],
            "output_dtype": qm.tensors[n.outputs[0]].dtype,
            "output_scale": qm.tensors[n.outputs[0]].scale,
            "output_zero_point": qm.tensors[n.outputs[0]].zero_point,
        }
        if "weight" in n.params:
            bits = n.attrs["weight_bits"]
            m = qm.constants[n.params["multiplier"]]
            s = qm.constants[n.params["shift"]]
            entry.update(
                {
                    "weight_bits": bits,
                    "activation_bits": 8,
                    "acc_bound": n.attrs.get("acc_bound"),
                    "weight_shape": list(qm.constants[n.params["weight"]].shape),
                    "dyadic": [[int(b), int(31 - c)] for b, c in zip(m, s, strict=True)],
                    "macs": n.attrs.get("macs"),
                }
            )
            bops += int(n.attrs.get("macs", 0)) * bits * 8
        elif "multiplier" in n.attrs:
            entry["dyadic"] = [[int(n.attrs["multiplier"]), int(31 - n.attrs["shift"])]]
        layers.append(entry)
    return {
        "name": qm.name,
        "inputs": [t.to_json() for t in qm.input_infos],
        "outputs": [{**qm.tensors[o.name].to_json(), "epilogue": o.epilogue} for o in qm.outputs],
        "layers": layers,
        "weight_bytes": qm.weight_bytes(),
        "bops": bops,
        "integer_only": integer_only(qm),
        "provenance": qm.provenance,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgekit.qmodel import load

    info = inspect_model(load(args.model))
    if args.json:
        _print_json(info)
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{info['name']}: {info['weight_bytes']:.0f} weight bytes, {info['bops'] / 1e9:.3f} GBOPs, "
        f"integer-only: {info['integer_only']}"
    )
    for col in ("layer", "op", "bits", "out scale / zp", "dyadic b/2^c (first channel)"):
        t.add_column(col)
    for layer in info["layers"]:
        dy = layer.get("dyadic")
        t.add_row(
            layer["name"][-48:],
            layer["op"],
            str(layer.get("weight_bits", "")),
            f"{layer['output_scale']:.4g} / {layer['output_zero_point']}" if layer["output_scale"] else "",
            f"{dy[0][0]}/2^{dy[0][1]}" if dy else "",
        )
    Console().print(t)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgekit.demo import run_demo

    result = run_demo(Path(args.workdir), quick=args.quick, table_to_stderr=args.json)
    if args.json:
        _print_json(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgekit import __version__

    p = argparse.ArgumentParser(prog="edgekit", description=__doc__)
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="quantize a float model and write .ekq / .tflite / .onnx")
    e.add_argument("model")
    e.add_argument("--calib", help="calibration data (.npz with x)")
    e.add_argument("--scheme", default="dyadic", choices=["dyadic", "mobilequant", "rtn", "smoothquant"])
    e.add_argument("--weight-bits", default="8", choices=["8", "4", "mixed"])
    e.add_argument("--act-bits", type=int, default=8)
    e.add_argument(
        "--observer",
        default="mse",
        choices=["minmax", "percentile", "mse"],
        help="activation range: MSE-optimal clipping (default), percentile, or min-max",
    )
    e.add_argument("--format", choices=["ekq", "tflite", "onnx"], help="default: from the output suffix")
    e.add_argument("--target", help="NPU target for the TFLite export, e.g. ethos-u55-128 (runs Vela)")
    e.add_argument("--calib-text", help="calibration text for language models")
    e.add_argument("--max-size", type=float, help="mixed: weight bytes as a fraction of int8")
    e.add_argument("--max-bops", type=float, help="mixed: BOPs as a fraction of int8")
    e.add_argument("--max-latency-ms", type=float, help="mixed: latency budget")
    e.add_argument("--device", help="mixed: device URL to measure latency on")
    e.add_argument("--json", action="store_true")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="accuracy and agreement with the float model (.ekq, .onnx, .tflite)")
    v.add_argument("model")
    v.add_argument("--data")
    v.add_argument("--limit", type=int, help="evaluate the first N samples only")
    v.add_argument("--text", help="text file for language-model perplexity")
    v.add_argument("--tokens", type=int, default=4096)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)

    r = sub.add_parser("run", help="save a model's raw outputs (integer outputs for .ekq)")
    r.add_argument("model")
    r.add_argument("--data", required=True)
    r.add_argument("-o", "--output", required=True)
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="layers, bit widths, dyadic rescales, weight bytes, BOPs")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="the whole flow on an embedded default model, on this host")
    d.add_argument("--workdir", default="edgekit-demo")
    d.add_argument("--quick", action="store_true", help="a smaller evaluation")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    for mod in PLUGINS:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:  # the stage's package is not part of this build
            found = False
        if found:
            importlib.import_module(mod).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgekitError as exc:
        print(f"edgekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
