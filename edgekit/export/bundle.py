"""Mobile app bundles: one folder (or zip) per runtime with the model, a metadata JSON the app
reads, and short Android (Kotlin) / iOS (Swift) integration snippets that use its names.

The metadata is self-sufficient: an app turns raw uint8 pixels into the model's integer input
with ``preprocessing`` and the input's ``scale``/``zero_point``, runs the model, and reads the
integer output (optionally dequantized, then softmax, as ``postprocessing`` says).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.qmodel import QuantModel

BUNDLE_FORMAT = "edgekit.bundle"
BUNDLE_VERSION = 1
RUNTIMES = ("litert", "onnxruntime")
LABEL_PRESETS = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
QUANTIZE_RULE = (
    "q = clamp(round_half_away_from_zero(x / scale) + zero_point, qmin, qmax), "
    "x = (pixel - mean[c]) / std[c] as float32"
)


def _version() -> str:
    import edgekit

    return edgekit.__version__


def resolve_labels(labels: str | list[str] | None, qm: QuantModel) -> list[str] | None:
    """Labels from a list, a preset name (``cifar10``), a text file (one per line) or the model."""
    if labels is None:
        found = qm.provenance.get("labels")
        return list(found) if found else None
    if isinstance(labels, list):
        return [str(v) for v in labels]
    if labels in LABEL_PRESETS:
        return list(LABEL_PRESETS[labels])
    p = Path(labels)
    if p.exists():
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if "," in labels:
        return [v.strip() for v in labels.split(",")]
    raise EdgekitError(f"--labels {labels!r}: not a preset ({', '.join(LABEL_PRESETS)}), a file, or a comma list")


def _io_entry(qm: QuantModel, name: str, *, offset: int, batch: int, extra: dict[str, Any]) -> dict[str, Any]:
    info = qm.tensors[name]
    shape = [batch if d is None else int(d) for d in info.shape]
    return {
        "name": name,
        "shape": shape,
        "dtype": "uint8" if offset else "int8",
        "scale": float(np.float32(info.scale)),
        "zero_point": int(info.zero_point) + offset,
        "qmin": 0 if offset else -128,
        "qmax": 255 if offset else 127,
        **extra,
    }


def build_metadata(
    qm: QuantModel,
    runtime: str,
    model_file: str,
    model_bytes: bytes,
    *,
    labels: list[str] | None,
    mean: list[float],
    std: list[float],
    io_names: tuple[list[str], list[str]] | None = None,
) -> dict[str, Any]:
    """The bundle's metadata.json: everything an app needs, by the model's own tensor names."""
    offset = 128 if runtime == "onnxruntime" else 0
    q_nodes = {n.inputs[0]: n.outputs[0] for n in qm.nodes if n.op == "quantize"}
    in_names = io_names[0] if io_names else [q_nodes[i] for i in qm.inputs]
    inputs = []
    for src, name in zip(qm.inputs, in_names, strict=True):
        layout = "NHWC" if len(qm.tensors[q_nodes[src]].shape) == 4 else "ND"
        inputs.append(
            _io_entry(qm, q_nodes[src], offset=offset, batch=1, extra={"layout": layout})
            | {"name": name, "tensor": q_nodes[src]}
        )
    outputs = []
    for spec, name in zip(qm.outputs, io_names[1] if io_names else [o.name for o in qm.outputs], strict=True):
        outputs.append(
            _io_entry(
                qm,
                spec.name,
                offset=offset,
                batch=1,
                extra={"epilogue": list(spec.epilogue), "softmax_axis": spec.softmax_axis},
            )
            | {"name": name}
        )
    channels = inputs[0]["shape"][-1] if inputs else 0
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "producer": f"edgekit {_version()}",
        "model": qm.name,
        "runtime": runtime,
        "model_file": model_file,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "content_hash": qm.content_hash(),
        "inputs": inputs,
        "outputs": outputs,
        "preprocessing": {
            "source": "uint8 image pixels",
            "layout": "NHWC",
            "channel_order": "RGB",
            "resize_to": inputs[0]["shape"][1:3] if inputs and inputs[0]["layout"] == "NHWC" else None,
            "mean": [float(v) for v in (mean * channels if len(mean) == 1 else mean)],
            "std": [float(v) for v in (std * channels if len(std) == 1 else std)],
            "raw_range": [0, 255],
            "quantize": QUANTIZE_RULE,
        },
        "postprocessing": {
            "integer_output": "the model's output tensor holds the integer logits (argmax gives top-1)",
            "dequantize": "real = (q - zero_point) * scale",
            "softmax": any("softmax" in o["epilogue"] for o in outputs),
        },
        "runtime_options": {
            "xnnpack": False if runtime == "litert" else None,
            "why": (
                "LiteRT's builtin int8 kernels give exactly edgekit's reference outputs; the XNNPACK "
                "delegate requantizes in float (a few LSB apart)"
            )
            if runtime == "litert"
            else "onnxruntime requantizes in float: outputs are within a few LSB of edgekit's reference",
        },
        "labels": labels,
    }


def _snippets(meta: dict[str, Any]) -> dict[str, str]:
    inp, out = meta["inputs"][0], meta["outputs"][0]
    h, w = (inp["shape"][1], inp["shape"][2]) if inp["layout"] == "NHWC" else (0, 0)
    c = inp["shape"][-1]
    mean, std = meta["preprocessing"]["mean"], meta["preprocessing"]["std"]
    n_out = int(np.prod(out["shape"]))
    signed = inp["dtype"] == "int8"
    store = "toByte()" if signed else "toByte() /* uint8 bits */"
    model = meta["model_file"]
    if meta["runtime"] == "litert":
        kotlin = f'''// Android, LiteRT: implementation("com.google.ai.edge.litert:litert:1.+")
// assets/: {model}, metadata.json. Input "{inp["name"]}" {inp["dtype"]} {inp["shape"]}, output "{out["name"]}".
import org.tensorflow.lite.Interpreter
import java.nio.ByteBuffer
import java.nio.ByteOrder
import kotlin.math.*

class Classifier(modelBuffer: ByteBuffer, private val labels: List<String>) {{
    // builtin int8 kernels: bit-exact with edgekit's reference (XNNPACK requantizes in float)
    private val interpreter = Interpreter(modelBuffer, Interpreter.Options().setNumThreads(1).setUseXNNPACK(false))
    private val scale = {inp["scale"]}f; private val zeroPoint = {inp["zero_point"]}
    private val mean = floatArrayOf({", ".join(f"{v}f" for v in mean)})
    private val std = floatArrayOf({", ".join(f"{v}f" for v in std)})

    /** rgb: {h}x{w}x{c} pixels, row-major NHWC, values 0..255. */
    fun classify(rgb: ByteArray): Pair<String, FloatArray> {{
        val input = ByteBuffer.allocateDirect({h * w * c}).order(ByteOrder.nativeOrder())
        for (i in rgb.indices) {{
            val x = ((rgb[i].toInt() and 0xFF) - mean[i % {c}]) / std[i % {c}]
            val r = x / scale; val q = (sign(r) * floor(abs(r) + 0.5f)).toInt() + zeroPoint
            input.put(q.coerceIn({inp["qmin"]}, {inp["qmax"]}).{store})
        }}
        input.rewind()
        val out = ByteBuffer.allocateDirect({n_out}).order(ByteOrder.nativeOrder())
        interpreter.runSignature(mapOf("{inp["name"]}" to input), mapOf("{out["name"]}" to out))
        val logits = FloatArray({n_out}) {{ (out.get(it).toInt() - ({out["zero_point"]})) * {out["scale"]}f }}
        val e = logits.map {{ exp(it - logits.max()) }}; val probs = e.map {{ it / e.sum() }}.toFloatArray()
        return labels[probs.indices.maxBy {{ probs[it] }}] to probs
    }}
}}
'''
        swift = f'''// iOS, LiteRT (TensorFlowLiteSwift pod). Bundle resources: {model}, metadata.json.
import TensorFlowLite
import Foundation

final class Classifier {{
    private let interpreter: Interpreter
    private let labels: [String]
    private let scale: Float = {inp["scale"]}, zeroPoint = {inp["zero_point"]}
    private let mean: [Float] = {mean}, std: [Float] = {std}

    init(modelPath: String, labels: [String]) throws {{
        var options = Interpreter.Options()
        options.isXNNPackEnabled = false  // builtin int8 kernels: bit-exact with edgekit's reference
        interpreter = try Interpreter(modelPath: modelPath, options: options)
        try interpreter.allocateTensors()
        self.labels = labels
    }}

    /// rgb: {h}x{w}x{c} bytes, NHWC, 0...255. Input "{inp["name"]}", output "{out["name"]}".
    func classify(rgb: [UInt8]) throws -> (String, [Float]) {{
        let q: [Int8] = rgb.enumerated().map {{ i, p in
            let r = ((Float(p) - mean[i % {c}]) / std[i % {c}]) / scale
            let v = Int((r < 0 ? -1 : 1) * floor(abs(r) + 0.5)) + zeroPoint
            return Int8(clamping: min(max(v, {inp["qmin"]}), {inp["qmax"]}))
        }}
        try interpreter.copy(q.withUnsafeBufferPointer {{ Data(buffer: $0) }}, toInputAt: 0)
        try interpreter.invoke()
        let raw = [Int8](try interpreter.output(at: 0).data.map {{ Int8(bitPattern: $0) }})
        let logits = raw.map {{ Float(Int($0) - ({out["zero_point"]})) * {out["scale"]} }}
        let m = logits.max()!, e = logits.map {{ exp($0 - m) }}, s = e.reduce(0, +)
        let probs = e.map {{ $0 / s }}
        return (labels[probs.firstIndex(of: probs.max()!)!], probs)
    }}
}}
'''
    else:
        kotlin = f'''// Android, onnxruntime: implementation("com.microsoft.onnxruntime:onnxruntime-android:1.+")
// assets/: {model}, metadata.json. Input "{inp["name"]}" uint8 {inp["shape"]} (int8 value + 128),
// output "{out["name"]}".
import ai.onnxruntime.*
import java.nio.ByteBuffer
import kotlin.math.*

class Classifier(modelBytes: ByteArray, private val labels: List<String>) {{
    private val env = OrtEnvironment.getEnvironment()
    private val session = env.createSession(modelBytes, OrtSession.SessionOptions())
    private val scale = {inp["scale"]}f; private val zeroPoint = {inp["zero_point"]}
    private val mean = floatArrayOf({", ".join(f"{v}f" for v in mean)})
    private val std = floatArrayOf({", ".join(f"{v}f" for v in std)})

    fun classify(rgb: ByteArray): Pair<String, FloatArray> {{
        val buf = ByteBuffer.allocateDirect(rgb.size)
        for (i in rgb.indices) {{
            val r = ((rgb[i].toInt() and 0xFF) - mean[i % {c}]) / std[i % {c}] / scale
            buf.put(((sign(r) * floor(abs(r) + 0.5f)).toInt() + zeroPoint).coerceIn(0, 255).toByte())
        }}
        buf.rewind()
        val t = OnnxTensor.createTensor(env, buf, longArrayOf({", ".join(str(v) for v in inp["shape"])}),
                                        OnnxJavaType.UINT8)
        val out = session.run(mapOf("{inp["name"]}" to t)).use {{ (it.get(0).value as Array<ByteArray>)[0] }}
        val logits = FloatArray({n_out}) {{ ((out[it].toInt() and 0xFF) - {out["zero_point"]}) * {out["scale"]}f }}
        val e = logits.map {{ exp(it - logits.max()) }}; val probs = e.map {{ it / e.sum() }}.toFloatArray()
        return labels[probs.indices.maxBy {{ probs[it] }}] to probs
    }}
}}
'''
        swift = f'''// iOS, onnxruntime (onnxruntime-objc pod). Resources: {model}, metadata.json.
import onnxruntime_objc
import Foundation

final class Classifier {{
    private let session: ORTSession
    private let labels: [String]
    private let scale: Float = {inp["scale"]}, zeroPoint = {inp["zero_point"]}
    private let mean: [Float] = {mean}, std: [Float] = {std}

    init(modelPath: String, labels: [String]) throws {{
        session = try ORTSession(env: ORTEnv(loggingLevel: .warning), modelPath: modelPath, sessionOptions: nil)
        self.labels = labels
    }}

    func classify(rgb: [UInt8]) throws -> String {{
        var q: [UInt8] = rgb.enumerated().map {{ i, p in
            let r = ((Float(p) - mean[i % {c}]) / std[i % {c}]) / scale
            return UInt8(clamping: Int((r < 0 ? -1 : 1) * floor(abs(r) + 0.5)) + zeroPoint)
        }}
        let input = try ORTValue(tensorData: NSMutableData(bytes: &q, length: q.count), elementType: .uInt8,
                                 shape: {inp["shape"]})
        let out = try session.run(withInputs: ["{inp["name"]}": input], outputNames: ["{out["name"]}"],
                                  runOptions: nil)["{out["name"]}"]!
        let raw = [UInt8](try out.tensorData() as Data)
        return labels[raw.firstIndex(of: raw.max()!)!]  // argmax of the integer logits = top-1
    }}
}}
'''
    return {"android/Classifier.kt": kotlin, "ios/Classifier.swift": swift}


def _readme(meta: dict[str, Any]) -> str:
    inp, out = meta["inputs"][0], meta["outputs"][0]
    return f"""# {meta["model"]} for {meta["runtime"]}

Made by {meta["producer"]}. Files: `{meta["model_file"]}` (the model), `metadata.json` (names, shapes,
quantization, preprocessing, labels), `android/Classifier.kt`, `ios/Classifier.swift`.

- input `{inp["name"]}`: {inp["dtype"]} {inp["shape"]} {inp["layout"]}, scale {inp["scale"]},
  zero point {inp["zero_point"]}
- output `{out["name"]}`: {out["dtype"]} {out["shape"]}, scale {out["scale"]}, zero point {out["zero_point"]}
  (integer logits; the app applies {" then ".join(out["epilogue"])} if it needs probabilities)
- preprocessing: uint8 RGB pixels, NHWC; x = (pixel - mean) / std; {meta["preprocessing"]["quantize"]}
"""


def write_bundle(
    qm: QuantModel,
    out: str | Path,
    *,
    runtimes: tuple[str, ...] = RUNTIMES,
    labels: str | list[str] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    as_zip: bool = False,
) -> dict[str, Any]:
    """Write one bundle per runtime under ``out`` (``out/litert/``, ``out/onnxruntime/`` or .zip)."""
    from edgekit.export.onnx_qdq import to_onnx
    from edgekit.export.tflite import to_tflite_bytes

    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        raise EdgekitError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lab = resolve_labels(labels, qm)
    mean = list(mean) if mean is not None else [0.0]
    std = list(std) if std is not None else [1.0]
    if any(s == 0 for s in std):
        raise EdgekitError("--std values must be non-zero")
    written: dict[str, Any] = {}
    for rt in runtimes:
        if rt == "litert":
            model_file = "model.tflite"
            data, _ = to_tflite_bytes(qm, batch=1)
        else:
            model_file = "model.onnx"
            data = to_onnx(qm).SerializeToString()
        # LiteRT: the signature keeps the model's own input/output names (tensor "<input>_int8" behind)
        names = (list(qm.inputs), [o.name for o in qm.outputs]) if rt == "litert" else None
        meta = build_metadata(qm, rt, model_file, data, labels=lab, mean=mean, std=std, io_names=names)
        files: dict[str, bytes] = {
            model_file: data,
            "metadata.json": json.dumps(meta, indent=1).encode(),
            "README.md": _readme(meta).encode(),
        }
        files.update({k: v.encode() for k, v in _snippets(meta).items()})
        folder = out / rt
        if folder.exists():
            shutil.rmtree(folder)
        if as_zip:
            path = out / f"{qm.name}-{rt}.zip"
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for name, blob in sorted(files.items()):
                    z.writestr(name, blob)
        else:
            path = folder
            for name, blob in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(blob)
        written[rt] = {"path": str(path), "files": sorted(files), "model_bytes": len(data)}
    return {"format": "bundle", "path": str(out), "bundles": written}
