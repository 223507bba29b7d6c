"""Artifact builders for the device runner: a ``reference`` artifact from a QuantModel, and runtime
artifacts (``tflite``, ``onnxruntime``) that carry the ``.ekq`` they came from as ``reference.ekq``
so ``edgekit validate`` finds its host reference without being told. ``model_file_artifact`` packs a
bare model file (``.tflite``, ``.onnx``, a CNN ``.ekq``) so the device commands take it as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import pack_artifact, sha256_file
from edgekit.qmodel import QuantModel, load

REFERENCE_MEMBER = "reference.ekq"


def io_specs(qm: QuantModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest ``inputs``/``outputs`` of a QuantModel (integer outputs, before the float epilogue)."""
    inputs = [qm.tensors[n].to_json() for n in qm.inputs]
    outputs = [qm.tensors[o.name].to_json() for o in qm.outputs]
    return inputs, outputs


def pack_reference_artifact(qm: QuantModel | str | Path, out: str | Path, *, target: str = "numpy") -> Path:
    """An artifact run by the agent's numpy reference executor (bit-exact by construction)."""
    qm = load(qm) if not isinstance(qm, QuantModel) else qm
    inputs, outputs = io_specs(qm)
    with tempfile.TemporaryDirectory() as tmp:
        ekq = qm.save(Path(tmp) / "model.ekq")
        manifest = {
            "runtime": "reference",
            "model_file": "model.ekq",
            "target": target,
            "model_hash": qm.content_hash(),
            "inputs": inputs,
            "outputs": outputs,
            "extra": {"name": qm.name},
        }
        return pack_artifact(out, manifest, {"model.ekq": ekq})


def pack_runtime_artifact(
    model_file: str | Path,
    runtime: str,
    out: str | Path,
    *,
    reference: QuantModel | None = None,
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    target: str = "cpu",
    extra: dict[str, Any] | None = None,
) -> Path:
    """An artifact for ``tflite``/``onnxruntime``/``tvm``; ``reference`` is packed as ``reference.ekq``."""
    model_file = Path(model_file)
    manifest: dict[str, Any] = {
        "runtime": runtime,
        "model_file": model_file.name,
        "target": target,
        "extra": dict(extra or {}),
    }
    files: dict[str, str | Path] = {model_file.name: model_file}
    with tempfile.TemporaryDirectory() as tmp:
        if reference is not None:
            files[REFERENCE_MEMBER] = reference.save(Path(tmp) / REFERENCE_MEMBER)
            manifest["model_hash"] = reference.content_hash()
            ins, outs = io_specs(reference)
            manifest["inputs"], manifest["outputs"] = inputs or ins, outputs or outs
        else:
            manifest["inputs"], manifest["outputs"] = inputs or [], outputs or []
        return pack_artifact(out, manifest, files)


def example_inputs(manifest: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the manifest's shapes (batch 1) and dtypes, for profiling."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in manifest.get("inputs", []):
        shape = [1 if d is None or (isinstance(d, int) and d < 0) or isinstance(d, str) else d for d in spec["shape"]]
        dtype = np.dtype(spec.get("dtype") or "float32")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            feeds[spec["name"]] = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        else:
            feeds[spec["name"]] = rng.uniform(0, 255, size=shape).astype(dtype)
    if not feeds:
        raise ValueError("the artifact's manifest lists no inputs; pass --input DATA.npz")
    return feeds


MODEL_FILE_CACHE = Path.home() / ".cache" / "edgekit" / "device-artifacts"
MODEL_FILE_RUNTIMES = {".tflite": "tflite", ".onnx": "onnxruntime", ".ekq": "reference"}


def _tflite_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from edgekit.device.runtimes.litert import interpreter_class

    it = interpreter_class()(model_path=str(path))

    def spec(d: dict[str, Any]) -> dict[str, Any]:
        out = {"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
        scale, zero = d.get("quantization", (0.0, 0))
        if scale:
            out["scale"], out["zero_point"] = float(scale), int(zero)
        return out

    return [spec(d) for d in it.get_input_details()], [spec(d) for d in it.get_output_details()]


def _onnx_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx
    from onnx import helper

    g = onnx.load(str(path), load_external_data=False).graph
    known = {i.name for i in g.initializer}

    def spec(v) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name}

    return [spec(v) for v in g.input if v.name not in known], [spec(v) for v in g.output]


def model_file_artifact(path: str | Path) -> Path | None:
    """A bare ``.tflite`` / ``.onnx`` / CNN ``.ekq`` packed as a device artifact (``tflite``,
    ``onnxruntime`` or ``reference`` runtime; cached on the file's content), or None for anything
    else. Inputs and outputs come from the model file itself."""
    path = Path(path)
    runtime = MODEL_FILE_RUNTIMES.get(path.suffix.lower())
    if runtime is None or not path.is_file():
        return None
    digest = sha256_file(path)[:20]
    art = MODEL_FILE_CACHE / f"{path.stem}-{runtime}-{digest}.tar"
    if art.is_file():
        return art
    MODEL_FILE_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = art.with_name(art.stem + ".partial.tar")
    if runtime == "reference":
        pack_reference_artifact(path, tmp)
    else:
        inputs, outputs = (_tflite_io if runtime == "tflite" else _onnx_io)(path)
        pack_runtime_artifact(path, runtime, tmp, inputs=inputs, outputs=outputs)
    tmp.replace(art)
    return art
