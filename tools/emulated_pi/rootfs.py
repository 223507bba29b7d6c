"""Build (once per recipe) and restore the emulated Pi's aarch64 Debian rootfs.

The finished rootfs is cached as a zstd tarball under ``~/.cache/edgekit/`` keyed by a hash of
the recipe below, so a machine pays the ~3 min of emulated debootstrap only once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = "bookworm"
DEB_PACKAGES = ["python3", "ca-certificates", "openssh-server", "procps"]
PIP_PACKAGES = ["numpy==2.2.6", "onnxruntime==1.31.1", "ai-edge-litert==2.3.0"]
PIP_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64"]
RECIPE_VERSION = 1

CACHE_DIR = Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def recipe_key() -> str:
    """Short hash of everything that decides the rootfs's contents."""
    recipe = {"v": RECIPE_VERSION, "suite": SUITE, "deb": DEB_PACKAGES, "pip": PIP_PACKAGES}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def tarball_path() -> Path:
    return CACHE_DIR / f"pi-rootfs-{SUITE}-arm64-{recipe_key()}.tar.zst"


def log(msg: str) -> None:
    print(f"emulated-pi: {msg}", file=sys.stderr, flush=True)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt is configured with (deb822 or one-line format)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*")) + ["/etc/apt/sources.list"]:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list*; configure apt first")


def ensure_binfmt() -> None:
    """Mount binfmt_misc and enable qemu-aarch64 so aarch64 ELFs run (chroot works)."""
    if not os.path.exists("/proc/sys/fs/binfmt_misc/register"):
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=True)
    if not os.path.exists("/proc/sys/fs/binfmt_misc/qemu-aarch64"):
        if subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False).returncode != 0:
            subprocess.run(["update-binfmts", "--import", "qemu-aarch64"], check=False)
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if not os.path.exists("/proc/sys/fs/binfmt_misc/qemu-aarch64"):
        raise RuntimeError("qemu-aarch64 binfmt is not registered; run tools/setup.d/50-device.sh as root")


def build_tarball() -> Path:
    """debootstrap + wheels into a fresh rootfs, then pack it into the cache."""
    out = tarball_path()
    if out.exists():
        return out
    ensure_binfmt()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = CACHE_DIR / f"build-{recipe_key()}"
    if work.exists():
        shutil.rmtree(work)
    root = work / "rootfs"
    mirror = debian_mirror()
    log(f"building the aarch64 rootfs from {mirror} (a few minutes, once per machine)")
    subprocess.run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--include=" + ",".join(DEB_PACKAGES),
            SUITE,
            str(root),
            mirror,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    site = root / "opt/site"
    plat = [a for p in PIP_PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-compile",
            "--root-user-action=ignore",
            "--target",
            str(site),
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            *plat,
            *PIP_PACKAGES,
        ],
        check=True,
    )
    (root / "usr/lib/python3/dist-packages/edgekit-site.pth").write_text("/opt/site\n")
    for f in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / f).glob("*"):
            if p.is_file():
                p.unlink()
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # generated per bring-up
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(["tar", "-C", str(root), "--zstd", "-cf", str(tmp), "."], check=True)
    tmp.replace(out)
    shutil.rmtree(work)
    log(f"cached {out} ({out.stat().st_size // (1 << 20)} MiB)")
    return out


def restore(dest: Path) -> None:
    """Unpack the cached rootfs into ``dest`` (building it first if needed)."""
    tar = build_tarball()
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "--zstd", "-xf", str(tar)], check=True)


if __name__ == "__main__":
    print(build_tarball())
