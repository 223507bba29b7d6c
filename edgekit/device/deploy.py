"""Deploy ("flash") an artifact: atomic and content-addressed.

The artifact is uploaded under a temporary name, its SHA-256 is checked on the device, it is
unpacked into a staging directory (every file's checksum checked again), and only then renamed
into the device's cache under its hash and made ``current``. A deploy that dies halfway leaves
the previous version in place and nothing half-written where the agent would load it. An
artifact already in the device's cache is not uploaded again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.artifact import ArtifactError, read_manifest, sha256_file
from edgekit.device.errors import DeployError
from edgekit.device.session import Session


@dataclass
class DeployResult:
    sha256: str
    runtime: str
    uploaded: bool
    bytes: int
    seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


def artifact_identity(artifact: str | Path) -> tuple[str, dict]:
    """(sha256 of the artifact file, its manifest); a foreign file raises ``DeployError``."""
    path = Path(artifact)
    if not path.is_file():
        raise DeployError(f"{path}: no such artifact; build one with `edgekit compile` or `edgekit export`")
    try:
        manifest = read_manifest(path)
    except ArtifactError as exc:
        raise DeployError(str(exc)) from exc
    return sha256_file(path), manifest


def deploy(
    session: Session, artifact: str | Path, *, progress: Callable[[int, int], None] | None = None, force: bool = False
) -> DeployResult:
    """Make ``artifact`` available on the device (upload skipped if the device has it already)."""
    t0 = time.monotonic()
    sha, manifest = artifact_identity(artifact)
    data = Path(artifact).read_bytes()
    if not force and session.has(sha):
        session.activate(sha)
        return DeployResult(sha, manifest["runtime"], False, 0, time.monotonic() - t0)
    if isinstance(session, Session):
        session.call("clean_incoming", age_s=3600)  # leftovers of uploads that died over an hour ago
    session.upload(data, sha, progress)
    return DeployResult(sha, manifest["runtime"], True, len(data), time.monotonic() - t0)
