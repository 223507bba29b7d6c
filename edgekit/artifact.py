"""The deployable artifact: a ``.tar`` with ``manifest.json`` and the files a runtime needs.

``manifest.json`` holds ``format`` ("edgekit.artifact"), ``version``, ``runtime`` (``tvm``,
``tflite``, ``onnxruntime`` or ``reference``), ``model_file`` (the file the runtime loads),
``target``, ``model_hash`` (content hash of the source ``.ekq``), ``inputs``/``outputs``
(name, shape, dtype, scale, zero_point), ``files`` ({name: sha256}) and free-form ``extra``.
Only numpy-free standard library here: the device agent imports this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

ARTIFACT_FORMAT = "edgekit.artifact"
ARTIFACT_VERSION = 1


class ArtifactError(Exception):
    """A corrupt, incomplete or foreign artifact."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_artifact(out: str | Path, manifest: dict[str, Any], files: dict[str, str | Path]) -> Path:
    """Write ``out`` (a tar) with ``manifest.json`` plus ``files`` ({name in tar: path})."""
    out = Path(out)
    m = dict(manifest)
    m.setdefault("format", ARTIFACT_FORMAT)
    m.setdefault("version", ARTIFACT_VERSION)
    m["files"] = {name: sha256_file(p) for name, p in files.items()}
    if m.get("model_file") not in m["files"]:
        raise ArtifactError(f"model_file {m.get('model_file')!r} is not among the packed files {sorted(files)}")
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        data = json.dumps(m, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))
        for name, p in sorted(files.items()):
            ti = tar.gettarinfo(str(p), arcname=name)
            ti.mtime = 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            with open(p, "rb") as f:
                tar.addfile(ti, f)
    tmp.replace(out)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact, checked for format and version."""
    try:
        with tarfile.open(path) as tar:
            f = tar.extractfile("manifest.json")
            if f is None:
                raise ArtifactError(f"{path}: manifest.json is missing")
            m = json.loads(f.read())
    except (tarfile.TarError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ArtifactError(
            f"{path}: not a readable edgekit artifact ({exc}); rebuild it with `edgekit compile`"
        ) from exc
    if m.get("format") != ARTIFACT_FORMAT or m.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{path}: unsupported artifact format {m.get('format')!r} version {m.get('version')!r}")
    return m


def unpack_artifact(path: str | Path, dest: str | Path) -> dict[str, Any]:
    """Extract into ``dest`` and verify every file's checksum; returns the manifest."""
    dest = Path(dest)
    m = read_manifest(path)
    with tarfile.open(path) as tar:
        names = set(m["files"]) | {"manifest.json"}
        for member in tar.getmembers():
            if (
                member.name not in names
                or not member.isfile()
                or Path(member.name).is_absolute()
                or ".." in member.name
            ):
                raise ArtifactError(f"{path}: unexpected member {member.name!r}")
        tar.extractall(dest, filter="data")
    for name, digest in m["files"].items():
        if sha256_file(dest / name) != digest:
            raise ArtifactError(f"{path}: checksum mismatch for {name}; the artifact is corrupt, rebuild it")
    return m
