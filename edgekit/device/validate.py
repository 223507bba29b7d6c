"""Validate an artifact on a device against the host reference executor, the float model and labels.

The dataset is streamed to the device in batches. Device outputs are compared with the host
reference executor (share of bit-exact samples, largest difference in LSBs), with the float model
(top-1 agreement, SQNR, cosine) and with the labels (top-1 accuracy). On any mismatch the device
is asked for the intermediate tensors of the first failing input and the first layer whose
output differs from the host's is named.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import read_manifest
from edgekit.device.artifacts import REFERENCE_MEMBER
from edgekit.device.deploy import deploy
from edgekit.device.errors import DeviceError, ValidationError
from edgekit.device.session import Session
from edgekit.qmodel import QuantModel, load
from edgekit.reference import epilogue


def host_reference(artifact: str | Path, manifest: dict[str, Any], reference: str | Path | None) -> QuantModel:
    """The ``.ekq`` the artifact was built from: ``--reference``, ``reference.ekq`` inside it, or its model."""
    if reference is not None:
        qm = load(reference)
    else:
        member = REFERENCE_MEMBER if REFERENCE_MEMBER in manifest.get("files", {}) else None
        if member is None and manifest.get("runtime") == "reference":
            member = manifest["model_file"]
        if member is None:
            raise ValidationError(
                f"{artifact}: no host reference inside the artifact; pass --reference MODEL.ekq (the model it was "
                f"compiled from)"
            )
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(artifact) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise ValidationError(f"{artifact}: {member} is not a file")
            path = Path(tmp) / "reference.ekq"
            path.write_bytes(f.read())
            qm = load(path)
    want = manifest.get("model_hash")
    if want and qm.content_hash() != want:
        raise ValidationError(
            f"the reference model does not match the artifact (model_hash {want[:12]}..., reference "
            f"{qm.content_hash()[:12]}...); pass the .ekq the artifact was compiled from"
        )
    return qm


def load_dataset(path: str | Path, limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (and ``y`` if present) of an .npz; ``limit`` keeps the first N samples."""
    try:
        with np.load(path) as npz:
            key = "x" if "x" in npz else npz.files[0]
            x = npz[key][:limit] if limit else npz[key]
            y = (npz["y"][:limit] if limit else npz["y"]) if "y" in npz else None
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{path}: not a readable .npz dataset ({exc})") from exc
    if len(x) == 0:
        raise ValidationError(f"{path}: the dataset is empty")
    return x, y


def float_model_path(qm: QuantModel, given: str | Path | None) -> Path | None:
    if given is not None:
        return Path(given)
    src = qm.provenance.get("source")
    path = src.get("path") if isinstance(src, dict) else src
    if path and Path(path).is_file() and str(path).endswith(".onnx"):
        return Path(path)
    return None


def _as_integer(qm: QuantModel, name: str, y: np.ndarray) -> np.ndarray:
    """Device outputs in the output tensor's integer units (floats are taken as dequantized values)."""
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    info = qm.tensors[name]
    return np.round(y.astype(np.float64) / info.scale).astype(np.int64) + int(info.zero_point or 0)


def device_input(qm: QuantModel, manifest: dict[str, Any], x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The input the artifact takes: the graph's own quantize step run on the host when the
    artifact expects quantized input (``extra.input_quantized``), else ``x`` in the manifest's dtype."""
    if (manifest.get("extra") or {}).get("input_quantized") and x.dtype != np.int8:
        from edgekit.reference import op_quantize

        name = qm.inputs[0]
        node = next((n for n in qm.nodes if n.op == "quantize" and n.inputs[0] == name), None)
        if node is not None:
            return op_quantize(qm, node, {name: np.asarray(x, dtype=np.float32)})
    return x.astype(dtype)


def first_divergent_layer(qm: QuantModel, device: dict[str, np.ndarray], host: dict[str, np.ndarray]) -> dict | None:
    """The first node (topological order) whose output differs between device and host."""
    for node in qm.nodes:
        t = node.outputs[0]
        if t not in device or t not in host:
            continue
        d, h = np.asarray(device[t]).astype(np.int64), np.asarray(host[t]).astype(np.int64)
        if d.shape != h.shape or not np.array_equal(d, h):
            diff = np.abs(d - h) if d.shape == h.shape else None
            return {
                "layer": node.name,
                "op": node.op,
                "tensor": t,
                "max_lsb_diff": int(diff.max()) if diff is not None else None,
                "differing_elements": int((diff > 0).sum()) if diff is not None else None,
                "elements": int(h.size),
            }
    return None


def validate(
    session: Session,
    artifact: str | Path,
    data: str | Path,
    *,
    reference: str | Path | None = None,
    float_model: str | Path | None = None,
    batch: int = 32,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the dataset on the device and compare; returns the JSON report."""
    t0 = time.monotonic()
    manifest = read_manifest(artifact)
    qm = host_reference(artifact, manifest, reference)
    x, y = load_dataset(data, limit)
    in_spec = manifest.get("inputs") or [qm.tensors[qm.inputs[0]].to_json()]
    in_name, in_dtype = in_spec[0]["name"], np.dtype(in_spec[0].get("dtype") or "float32")
    host_name = qm.inputs[0]
    out_names = [o.name for o in qm.outputs]
    dev_names = [o["name"] for o in manifest.get("outputs", [])] or out_names

    fpath = float_model_path(qm, float_model)
    fsess = None
    if fpath is not None:
        import onnxruntime as ort

        fsess = ort.InferenceSession(str(fpath), providers=["CPUExecutionProvider"])

    dep = deploy(session, artifact)
    session.load(dep.sha256)
    n = len(x)
    exact = np.zeros(n, dtype=bool)
    max_lsb = 0
    dev_top1, host_top1, float_top1 = [], [], []
    sig, noise, cos_num, cos_a, cos_b = 0.0, 0.0, 0.0, 0.0, 0.0
    first_fail: int | None = None
    for start in range(0, n, batch):
        xf = x[start : start + batch].astype(np.float32)
        xb = device_input(qm, manifest, x[start : start + batch], in_dtype)
        outs, _ = session.run({in_name: xb})
        dev_list = [outs[k] if k in outs else list(outs.values())[i] for i, k in enumerate(dev_names)]
        host = qm.run({host_name: xb}, integer=True)
        ok = np.ones(len(xb), dtype=bool)
        for name, dev in zip(out_names, dev_list, strict=False):
            d, h = _as_integer(qm, name, dev), host[name].astype(np.int64)
            if d.shape != h.shape:
                raise DeviceError(f"device output {name} has shape {d.shape}, the host reference {h.shape}")
            diff = np.abs(d - h).reshape(len(xb), -1)
            ok &= diff.max(axis=1) == 0
            max_lsb = max(max_lsb, int(diff.max()))
        exact[start : start + len(xb)] = ok
        if first_fail is None and not ok.all():
            first_fail = start + int(np.argmin(ok))
        main = out_names[0]
        dev_float = epilogue(qm, main, np.clip(_as_integer(qm, main, dev_list[0]), -128, 127).astype(np.int8))
        dev_top1.append(dev_float.reshape(len(xb), -1).argmax(1))
        host_top1.append(epilogue(qm, main, host[main]).reshape(len(xb), -1).argmax(1))
        if fsess is not None:
            fin = fsess.get_inputs()[0].name
            fout = fsess.run(None, {fin: xf})[0].reshape(len(xb), -1).astype(np.float64)
            dq = dev_float.reshape(len(xb), -1).astype(np.float64)
            float_top1.append(fout.argmax(1))
            sig += float((fout**2).sum())
            noise += float(((fout - dq) ** 2).sum())
            cos_num += float((fout * dq).sum())
            cos_a += float((fout**2).sum())
            cos_b += float((dq**2).sum())
        if progress:
            progress(min(start + batch, n), n)

    dev_pred = np.concatenate(dev_top1)
    report: dict[str, Any] = {
        "device": session.url,
        "artifact": str(artifact),
        "runtime": manifest["runtime"],
        "n": n,
        "bit_exact_fraction": float(exact.mean()),
        "max_lsb_diff": max_lsb,
        "top1_agreement_reference": float((dev_pred == np.concatenate(host_top1)).mean()),
        "top1_agreement_float": None,
        "sqnr_db": None,
        "cosine": None,
    }
    if fsess is not None:
        fpred = np.concatenate(float_top1)
        report["top1_agreement_float"] = float((dev_pred == fpred).mean())
        report["sqnr_db"] = float(10 * np.log10(sig / noise)) if noise > 0 else float("inf")
        report["cosine"] = float(cos_num / np.sqrt(cos_a * cos_b)) if cos_a and cos_b else None
        report["float_model"] = str(fpath)
        if y is not None:
            report["top1_float"] = float((fpred == y).mean())
    if y is not None:
        report["top1"] = float((dev_pred == y).mean())
    report["first_mismatch"] = None
    if first_fail is not None:
        x1 = device_input(qm, manifest, x[first_fail : first_fail + 1], in_dtype)
        report["first_mismatch"] = locate_mismatch(session, qm, manifest, x1, in_name, host_name, first_fail)
    report["seconds"] = time.monotonic() - t0
    return report


def _same_shape(want: tuple, got: tuple) -> bool:
    """Equal shapes, the batch (first) dimension and unknown (None) dimensions aside."""
    return len(want) == len(got) and all(w is None or w == g for w, g in zip(want[1:], got[1:], strict=True))


def _stem(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)[:48]


def kernel_outputs_by_tensor(qm: QuantModel, kernels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map a compiled model's per-kernel outputs (keyed by kernel name, in call order) to the graph's
    tensor names. edgekit's TVM lowering names each node's kernel ``<family>_<node name with
    non-identifier characters as _, cut to 48>`` (TVM may add a numeric suffix to repeated names);
    nodes and kernels both come in topological order, so each node takes the first unused kernel
    whose name ends with its own and whose output has the node's shape. A conv2d fused with the
    residual add it feeds (``edgekit.compile.fusion``: one ``conv2d..._add_<add node>`` kernel computes
    the add's output) has no output of its own: it is left out, so it cannot take a later kernel."""
    from edgekit.compile.fusion import FUSED_SUFFIX, residual_fusions

    host_shapes = {t: tuple(info.shape) for t, info in qm.tensors.items() if getattr(info, "shape", None)}
    names = list(kernels)
    fused = set()
    for add, (conv, _) in residual_fusions(qm).items():
        pattern = re.compile(r"conv2d\w*" + FUSED_SUFFIX + "_" + re.escape(_stem(add)) + r"(_?\d+)?(#\d+)?")
        if any(pattern.fullmatch(k) for k in names):
            fused.add(conv)
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    for node in qm.nodes:
        if node.name in fused:
            continue
        pattern = re.compile(r".+_" + re.escape(_stem(node.name)) + r"(_?\d+)?(#\d+)?")
        want = host_shapes.get(node.outputs[0])
        for k in names:
            if k in used or not pattern.fullmatch(k):
                continue
            shape = tuple(kernels[k].shape)
            if want is not None and not _same_shape(want, shape):
                continue
            used.add(k)
            out[node.outputs[0]] = kernels[k]
            break
    return out


def locate_mismatch(
    session: Session, qm: QuantModel, manifest: dict, x1: np.ndarray, in_name: str, host_name: str, index: int
) -> dict[str, Any]:
    """Fetch the device's intermediate tensors for one failing input and name the first differing layer."""
    found: dict[str, Any] = {"index": index}
    try:
        device = session.intermediates({in_name: x1})
    except DeviceError as exc:
        found["layer"] = None
        found["note"] = f"intermediate tensors not available from the {manifest['runtime']} runtime ({exc})"
        return found
    host = qm.run_all({host_name: x1})
    compiled = bool(device) and not set(device) & set(host)
    if compiled:  # a compiled model: outputs by kernel, not by tensor
        device = kernel_outputs_by_tensor(qm, device)
        found["compared_tensors"] = len(device)
    layer = first_divergent_layer(qm, device, host)
    if layer is None:
        found["layer"] = None
        found["note"] = "every intermediate tensor matches: the difference is in the output epilogue or batching"
    else:
        found.update(layer)
        if compiled and layer["op"] == "add":
            from edgekit.compile.fusion import residual_fusions

            conv = residual_fusions(qm).get(layer["layer"], (None, 0))[0]
            conv_out = next((n.outputs[0] for n in qm.nodes if n.name == conv), None)
            if conv_out is not None and conv_out not in device:  # one kernel computed the conv and the add
                found["fused_with"] = conv
                found["note"] = f"the kernel computing this add also computes the conv2d {conv!r} (fused)"
    return found
