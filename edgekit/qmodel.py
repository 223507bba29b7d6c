"""The quantized model: one artifact type, and its versioned file format (``.ekq``).

A ``QuantModel`` is a graph of integer operators in NHWC layout. Every activation tensor
between the input ``quantize`` and the output epilogue is int8 with a per-tensor scale and
zero point; weights are int8 (values in the range of their bit width: [-127, 127] for 8
bits, [-8, 7] for 4 bits) with per-output-channel scales and zero point 0; biases are int32;
each rescale is a dyadic (M, shift) pair (see ``edgekit.quant.arith``).

Operators (``QNode.op``) and what they read (``attrs``/``params``):

- ``quantize``   float32 -> int8 at a graph input: round(x / scale) + zero point, clamped.
- ``conv2d``     params weight [O, KH, KW, I/groups], bias [O], multiplier [O], shift [O];
                 attrs strides, dilations, pads [top, left, bottom, right], groups,
                 weight_bits, act_min, act_max (int8 clamp, carries a fused ReLU/ReLU6).
- ``dense``      params weight [O, K], bias [O], multiplier [O], shift [O]; attrs weight_bits,
                 act_min, act_max. Applies to the last axis.
- ``add``        two int8 inputs (broadcast): TFLite's ADD with left_shift 20 and dyadic
                 rescales of both inputs and of the sum; attrs left_shift, multiplier_a,
                 shift_a, multiplier_b, shift_b, multiplier, shift, act_min, act_max.
- ``mul``        two int8 inputs (the second may be a constant): ((a - za)(b - zb)) rescaled
                 by (multiplier, shift); attrs multiplier, shift, act_min, act_max.
- ``maxpool``    attrs kernel, strides, pads; padded cells are ignored; same scale in and out.
- ``avgpool``    attrs kernel, strides, pads; padded cells are not counted; averages the raw
                 int8 values with TFLite's rounding (half away from zero), division-free.
- ``requantize`` int8 -> int8 rescale (multiplier, shift, act_min, act_max).
- ``concat``     attrs axis, and per input a rescale (multipliers, shifts) to the output scale.
- ``pad``        attrs pads [[before, after], ...] per axis; fills with the output zero point.
- ``reshape``    attrs shape (-1 allowed once). ``transpose``: attrs perm.
- ``lut``        int8 -> int8 table lookup (params table[256], index q + 128); attrs function.
- ``clamp``      attrs act_min, act_max.

Outputs end in an epilogue run on the host side of the integer graph: ``dequantize``, or
``dequantize`` then ``softmax`` (only at a graph output, and marked as such).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ModelFormatError

FORMAT_NAME = "edgekit.qmodel"
FORMAT_VERSION = 1


@dataclass
class TensorInfo:
    """An activation tensor: shape (None for the batch axis), dtype, quantization."""

    name: str
    shape: list[int | None]
    dtype: str  # "int8", "int32" or "float32"
    scale: float | None = None
    zero_point: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": self.shape,
            "dtype": self.dtype,
            "scale": self.scale,
            "zero_point": self.zero_point,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> TensorInfo:
        return TensorInfo(d["name"], list(d["shape"]), d["dtype"], d.get("scale"), d.get("zero_point"))


@dataclass
class QNode:
    """One integer operator. ``params`` maps a role (``weight``, ``bias``...) to a constant name."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "attrs": self.attrs,
            "params": self.params,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> QNode:
        return QNode(d["op"], d["name"], list(d["inputs"]), list(d["outputs"]), dict(d["attrs"]), dict(d["params"]))


@dataclass
class OutputSpec:
    """A graph output: the integer tensor and the float epilogue applied after it."""

    name: str
    epilogue: list[str] = field(default_factory=lambda: ["dequantize"])
    softmax_axis: int = -1


@dataclass
class QuantModel:
    """An integer-only model: nodes in topological order, integer constants, metadata."""

    name: str
    inputs: list[str]
    outputs: list[OutputSpec]
    tensors: dict[str, TensorInfo]
    nodes: list[QNode]
    constants: dict[str, np.ndarray]
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    constant_bits: dict[str, int] = field(default_factory=dict)

    # ---- running -------------------------------------------------------------------
    def run(self, x: np.ndarray | dict[str, np.ndarray], *, integer: bool = False) -> dict[str, np.ndarray]:
        """Run the reference executor; floats out (after the epilogue) unless ``integer``."""
        from edgekit.reference import execute

        return execute(self, x, integer_outputs=integer)

    def run_all(self, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every intermediate tensor by name (integer), for layer-by-layer comparisons."""
        from edgekit.reference import execute_all

        return execute_all(self, x)

    # ---- facts ---------------------------------------------------------------------
    def node_by_output(self, tensor: str) -> QNode | None:
        for n in self.nodes:
            if tensor in n.outputs:
                return n
        return None

    @property
    def input_infos(self) -> list[TensorInfo]:
        return [self.tensors[n] for n in self.inputs]

    @property
    def output_infos(self) -> list[TensorInfo]:
        return [self.tensors[o.name] for o in self.outputs]

    def weight_bytes(self) -> float:
        """Bytes of weights at their bit width (int4 packs two per byte)."""
        total = 0.0
        for n in self.nodes:
            w = n.params.get("weight")
            if w is not None:
                total += self.constants[w].size * n.attrs.get("weight_bits", 8) / 8
        return total

    def content_hash(self) -> str:
        """Identity of the computation (graph, quantization, constants); provenance excluded."""
        h = hashlib.sha256()
        manifest = self._manifest()
        manifest.pop("provenance")
        h.update(json.dumps(manifest, sort_keys=True).encode())
        for k in sorted(self.constants):
            a = np.ascontiguousarray(self.constants[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    # ---- file format ---------------------------------------------------------------
    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": [o.__dict__ for o in self.outputs],
            "tensors": [t.to_json() for t in self.tensors.values()],
            "nodes": [n.to_json() for n in self.nodes],
            "calibration": self.calibration,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write the model as a zip of ``model.json`` and ``.npy`` arrays (no pickle)."""
        path = Path(path)
        manifest = self._manifest()
        arrays = []
        for i, (name, arr) in enumerate(sorted(self.constants.items())):
            bits = self.constant_bits.get(name, 0)
            entry = {"name": name, "file": f"arrays/{i:05d}.npy", "dtype": str(arr.dtype), "shape": list(arr.shape)}
            data = arr
            if bits == 4:
                entry["packed_int4"] = True
                data = pack_int4(arr)
            arrays.append((entry, data))
        manifest["arrays"] = [e for e, _ in arrays]
        return write_model_zip(path, manifest, arrays)


def write_model_zip(path: Path, manifest: dict[str, Any], arrays: list[tuple[dict[str, Any], np.ndarray]]) -> Path:
    """Write ``model.json`` and each array as ``.npy`` (no pickle) into a zip, atomically
    (temporary name, then rename), with fixed timestamps so equal models give equal bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        _write(z, "model.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        for entry, data in arrays:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(data), allow_pickle=False)
            _write(z, entry["file"], buf.getvalue())
    tmp.replace(path)
    return path


def _write(z: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    z.writestr(info, data)


def pack_int4(a: np.ndarray) -> np.ndarray:
    """Two signed 4-bit values per byte, low nibble first, flattened."""
    flat = a.astype(np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    u = (flat.astype(np.uint8) & 0x0F).reshape(-1, 2)
    return (u[:, 0] | (u[:, 1] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``pack_int4``."""
    p = packed.astype(np.uint8)
    lo = (p & 0x0F).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    vals = np.stack([lo, hi], axis=1).reshape(-1)
    vals = np.where(vals > 7, vals - 16, vals).astype(np.int8)
    n = int(np.prod(shape)) if shape else 1
    return vals[:n].reshape(shape)


def load(path: str | Path) -> QuantModel:
    """Read an ``.ekq`` file (a language model loads as ``edgekit.llm.QuantLM``); a corrupt or
    foreign file raises ``ModelFormatError``."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            manifest = json.loads(z.read("model.json"))
            if manifest.get("format") == "edgekit.lm":  # a quantized language model
                from edgekit.llm.qlm import load_lm

                return load_lm(path)
            if manifest.get("format") != FORMAT_NAME:
                raise ModelFormatError(f"{path}: not an edgekit quantized model (format {manifest.get('format')!r})")
            if manifest.get("version") != FORMAT_VERSION:
                raise ModelFormatError(
                    f"{path}: format version {manifest.get('version')} is not supported by this edgekit "
                    f"(reads version {FORMAT_VERSION}); re-export the model with this version"
                )
            constants: dict[str, np.ndarray] = {}
            bits: dict[str, int] = {}
            for e in manifest["arrays"]:
                data = np.load(io.BytesIO(z.read(e["file"])), allow_pickle=False)
                if e.get("packed_int4"):
                    data = unpack_int4(data, tuple(e["shape"]))
                    bits[e["name"]] = 4
                constants[e["name"]] = data.astype(e["dtype"]).reshape(e["shape"])
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, json.JSONDecodeError, OSError) as exc:
        raise ModelFormatError(
            f"{path}: not a readable edgekit model ({exc}); re-export it with `edgekit export`"
        ) from exc
    return QuantModel(
        name=manifest["name"],
        inputs=list(manifest["inputs"]),
        outputs=[OutputSpec(**o) for o in manifest["outputs"]],
        tensors={t["name"]: TensorInfo.from_json(t) for t in manifest["tensors"]},
        nodes=[QNode.from_json(n) for n in manifest["nodes"]],
        constants=constants,
        calibration=manifest.get("calibration", {}),
        provenance=manifest.get("provenance", {}),
        constant_bits=bits,
    )
