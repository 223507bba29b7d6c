"""Running aarch64 artifacts on this x86 machine: a tiny C++ runner (``runner.cc``) linked
against the aarch64 ``libtvm_runtime.so`` (from the aarch64 apache-tvm wheel, cached by
``tools/setup.d/40-tvm.sh``), executed under qemu-user with an explicit ``QEMU_CPU``.

The same runner plus the two runtime libraries is the TVM runtime an aarch64 device needs (the
device agent drives it, ``edgekit/device/runtimes/tvm_runner.py``): ``install_device_runtime(DIR)``
or ``python -m edgekit.compile.emulate --device-runtime DIR`` writes ``DIR/bin/ek_runner`` and
``DIR/lib/libtvm_{runtime,ffi}.so`` (the runner finds ``../lib`` by its rpath); copy ``DIR`` to
``/opt/edgekit-tvm`` on the device."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

CACHE = Path(os.environ.get("EDGEKIT_CACHE", str(Path.home() / ".cache" / "edgekit")))
A64 = CACHE / "tvm-aarch64"
HERE = Path(__file__).resolve().parent


class EmulationUnavailable(EdgekitError):
    """qemu-user, the aarch64 compiler or the aarch64 TVM runtime is missing."""


def _host_include_dirs() -> list[str]:
    import tvm
    import tvm_ffi

    return [str(Path(tvm.__file__).parent / "include"), str(Path(tvm_ffi.__file__).parent / "include")]


def qemu_binary() -> str:
    for name in ("qemu-aarch64-static", "qemu-aarch64"):
        p = shutil.which(name)
        if p:
            return p
    raise EmulationUnavailable("qemu-user is not installed: apt-get install qemu-user-static (tools/setup.d/40-tvm.sh)")


def runtime_dir() -> Path:
    lib = A64 / "lib"
    if not (lib / "libtvm_runtime.so").is_file():
        raise EmulationUnavailable(f"no aarch64 TVM runtime in {lib}: run tools/setup.d/40-tvm.sh")
    return lib


def available() -> bool:
    try:
        qemu_binary()
        runtime_dir()
    except EmulationUnavailable:
        return False
    return shutil.which("aarch64-linux-gnu-g++") is not None


def runner_binary() -> Path:
    """Build (once, cached on the source's content) the aarch64 runner."""
    lib = runtime_dir()
    src = HERE / "runner.cc"
    import hashlib

    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = A64 / f"ek_runner-{tag}"
    if out.is_file():
        return out
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        raise EmulationUnavailable("aarch64-linux-gnu-g++ is missing: apt-get install g++-aarch64-linux-gnu")
    inc = sum((["-I", d] for d in _host_include_dirs()), [])
    tmp = out.with_name(out.name + ".tmp")
    # rpath: the host's cache (qemu-user runs here) and ../lib beside the binary (the layout on a device)
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        *inc,
        str(src),
        "-o",
        str(tmp),
        "-L",
        str(lib),
        "-ltvm_runtime",
        "-ltvm_ffi",
        f"-Wl,-rpath,{lib}:$ORIGIN/../lib:$ORIGIN",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise EmulationUnavailable(f"building the aarch64 runner failed:\n{r.stderr[-2000:]}")
    tmp.replace(out)
    return out


DEVICE_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")


def device_runtime_files() -> dict[str, Path]:
    """What an aarch64 device needs to run TVM artifacts: {path under the prefix: file here}."""
    lib = runtime_dir()
    files = {"bin/ek_runner": runner_binary()}
    for name in DEVICE_LIBRARIES:
        if not (lib / name).is_file():
            raise EmulationUnavailable(f"no {name} in {lib}: run tools/setup.d/40-tvm.sh")
        files[f"lib/{name}"] = lib / name
    return files


def install_device_runtime(prefix: str | Path) -> Path:
    """Write the aarch64 TVM device runtime (runner + libraries) under ``prefix``."""
    prefix = Path(prefix)
    for rel, src in device_runtime_files().items():
        dst = prefix / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.chmod(0o755)
        tmp.replace(dst)
    return prefix


def run_aarch64(
    lib_path: str | Path,
    xs: list[np.ndarray],
    out_shapes: list[list[int]],
    qemu_cpu: str,
    repeats: int = 0,
    timeout: float = 600.0,
) -> tuple[list[list[np.ndarray]], float | None]:
    """Run a compiled aarch64 library on each int8 input of ``xs`` (one qemu process for all);
    returns (per input, the list of outputs; median microseconds of ``repeats`` timed runs or None)."""
    if not qemu_cpu:
        raise EmulationUnavailable("no qemu CPU model given: the target's [device] qemu_cpu must name one")
    if not xs:
        return [], None
    runner = runner_binary()
    env = dict(os.environ, QEMU_CPU=qemu_cpu, QEMU_LD_PREFIX="/usr/aarch64-linux-gnu")
    shape = xs[0].shape
    with tempfile.TemporaryDirectory(prefix="ek-qemu-") as td:
        fin, fout = Path(td) / "in.bin", Path(td) / "out.bin"
        np.ascontiguousarray(np.stack(xs), dtype=np.int8).tofile(fin)
        cmd = [
            qemu_binary(),
            str(runner),
            str(Path(lib_path).resolve()),
            str(fin),
            str(fout),
            str(len(shape)),
            *map(str, shape),
            str(repeats),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if r.returncode != 0:
            raise EdgekitError(f"the aarch64 run under qemu ({qemu_cpu}) failed: {r.stderr[-1500:]}")
        data = np.fromfile(fout, dtype=np.int8)
    results, off = [], 0
    for _ in xs:
        outs = []
        for shp in out_shapes:
            n = int(np.prod(shp))
            outs.append(data[off : off + n].reshape(shp))
            off += n
        results.append(outs)
    median = None
    for line in r.stdout.splitlines():
        if line.startswith("median_us"):
            median = float(line.split()[1])
    return results, median


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="aarch64 TVM runner (built for qemu checks and for devices)")
    ap.add_argument(
        "--device-runtime",
        metavar="DIR",
        required=True,
        help="write bin/ek_runner and lib/libtvm_{runtime,ffi}.so under DIR (copy it to /opt/edgekit-tvm)",
    )
    print(install_device_runtime(ap.parse_args().device_runtime))
