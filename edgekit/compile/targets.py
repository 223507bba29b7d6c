"""Compile targets: one TOML file per target (``targets/*.toml`` in the repo, plus the user's
``~/.config/edgekit/targets``, ``$EDGEKIT_TARGETS_DIR`` and ``--targets-dir``; later ones win).

A target names the TVM target dict, the (cross) compiler and link flags, the runtime the
device needs, its default thread count and the qemu CPU model used to emulate it.
"""

from __future__ import annotations

import glob
import os
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "targets"
USER_DIR = Path(os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config"))) / "edgekit" / "targets"


class TargetError(EdgekitError):
    """An unknown or malformed target, or a toolchain that is missing."""


@dataclass
class TargetSpec:
    """One target, as read from its TOML file."""

    name: str
    description: str
    arch: str
    tvm: dict[str, Any]
    toolchain: dict[str, Any]
    runtime: dict[str, Any]
    device: dict[str, Any]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return int(self.device.get("threads", 1))

    @property
    def qemu_cpu(self) -> str:
        return str(self.device.get("qemu_cpu", ""))

    @property
    def cross(self) -> bool:
        return bool(self.toolchain.get("cross", False))

    @property
    def is_android(self) -> bool:
        return bool(self.toolchain.get("ndk", False))

    def tvm_dict(self) -> dict[str, Any]:
        """The TVM target dict with ``mcpu = "native"`` resolved to this machine's CPU."""
        d = dict(self.tvm)
        if d.get("mcpu") == "native":
            from tvm.target import codegen

            d["mcpu"] = str(codegen.llvm_get_system_cpu())
        return d

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm_dict())

    def compiler(self) -> str | None:
        """Path of the C++ compiler that links the library; raises ``TargetError`` saying how to get it."""
        cc = str(self.toolchain.get("cc", ""))
        if self.is_android:
            return find_ndk_clang(cc, self.name)
        if not cc:
            return None
        path = shutil.which(cc)
        if path is None:
            hint = (
                " (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu, or run tools/setup.d/40-tvm.sh)"
                if "aarch64" in cc
                else ""
            )
            raise TargetError(f"target {self.name!r} needs the compiler {cc!r}, which is not on PATH{hint}")
        return path


def find_ndk_clang(cc: str, target: str) -> str:
    """The NDK's clang++ wrapper ``cc`` (e.g. aarch64-linux-android28-clang++)."""
    roots = [os.environ.get(k) for k in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK", "NDK_ROOT")]
    sdk = os.environ.get("ANDROID_HOME") or os.environ.get("ANDROID_SDK_ROOT")
    if sdk:
        roots += sorted(glob.glob(os.path.join(sdk, "ndk", "*")), reverse=True)
    for root in filter(None, roots):
        for cand in glob.glob(os.path.join(root, "toolchains", "llvm", "prebuilt", "*", "bin", cc)):
            return cand
    found = shutil.which(cc)
    if found:
        return found
    raise TargetError(
        f"target {target!r} is built with the Android NDK, which was not found: install the NDK (r26 or newer, "
        f"e.g. `sdkmanager 'ndk;27.2.12479018'`) and set ANDROID_NDK_HOME to it, or put {cc} on PATH"
    )


def search_dirs(targets_dir: str | Path | None = None) -> list[Path]:
    """Where targets are looked up, lowest precedence first."""
    dirs = [BUILTIN_DIR, USER_DIR]
    env = os.environ.get("EDGEKIT_TARGETS_DIR")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    if targets_dir:
        dirs.append(Path(targets_dir))
    return dirs


_SECTIONS = ("tvm", "toolchain", "runtime", "device")


def parse_target(path: Path) -> TargetSpec:
    """Read and check one target TOML file."""
    try:
        d = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TargetError(f"{path}: not a readable target file ({exc}); fix or remove it") from exc
    for s in _SECTIONS:
        if not isinstance(d.get(s), dict):
            raise TargetError(f"{path}: missing the [{s}] table (see targets/rpi4.toml for a complete example)")
    if d["tvm"].get("kind") != "llvm":
        raise TargetError(f'{path}: [tvm] kind must be "llvm" (got {d["tvm"].get("kind")!r})')
    if not isinstance(d["device"].get("threads", 1), int) or d["device"].get("threads", 1) < 1:
        raise TargetError(f"{path}: [device] threads must be a positive integer")
    known = {"name", "description", "arch", *_SECTIONS}
    return TargetSpec(
        name=str(d.get("name", path.stem)),
        description=str(d.get("description", "")),
        arch=str(d.get("arch", "aarch64" if "aarch64" in str(d["tvm"].get("mtriple", "")) else "x86_64")),
        tvm=dict(d["tvm"]),
        toolchain=dict(d["toolchain"]),
        runtime=dict(d["runtime"]),
        device=dict(d["device"]),
        source=str(path),
        extra={k: v for k, v in d.items() if k not in known},
    )


def list_targets(targets_dir: str | Path | None = None) -> dict[str, TargetSpec]:
    """Every target found, by name (a later directory overrides an earlier one)."""
    out: dict[str, TargetSpec] = {}
    for d in search_dirs(targets_dir):
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                spec = parse_target(p)
                out[spec.name] = spec
    return out


def get_target(target: str | TargetSpec, targets_dir: str | Path | None = None) -> TargetSpec:
    """A target by name, or by the path of a TOML file."""
    if isinstance(target, TargetSpec):
        return target
    if target.endswith(".toml") and Path(target).is_file():
        return parse_target(Path(target))
    found = list_targets(targets_dir)
    if target not in found:
        raise TargetError(
            f"unknown target {target!r}; known: {', '.join(sorted(found))} "
            f"(add your own as a TOML file in {USER_DIR} or pass --targets-dir)"
        )
    return found[target]
