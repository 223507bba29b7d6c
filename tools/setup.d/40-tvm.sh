#!/usr/bin/env bash
# TVM compile path: aarch64 cross compiler, qemu-user (emulated runs of rpi artifacts) and the
# aarch64 TVM runtime (from the aarch64 apache-tvm wheel), cached under ~/.cache/edgekit.
# Idempotent and quiet; every step is skipped when its result is already there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user-static)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cache="${EDGEKIT_CACHE:-$HOME/.cache/edgekit}/tvm-aarch64"
rt="$cache/lib/libtvm_runtime.so"
if [ ! -s "$rt" ]; then
    mkdir -p "$cache/wheel" "$cache/lib"
    python3 -m pip download -q --disable-pip-version-check --no-deps --platform manylinux_2_28_aarch64 \
        --only-binary=:all: --python-version 3.11 -d "$cache/wheel" apache-tvm==0.27.0.post1 \
        apache-tvm-ffi==0.1.14.post1
    python3 - "$cache" <<'PY'
import pathlib, shutil, sys, zipfile
cache = pathlib.Path(sys.argv[1])
lib = cache / "lib"
inc = cache / "include"
for whl in sorted((cache / "wheel").glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            base = n.rsplit("/", 1)[-1]
            if base.endswith(".so") and ("tvm_runtime" in base or "tvm_ffi" in base) and "testing" not in base and "cuda" not in base:
                with z.open(n) as src, open(lib / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            elif "/include/" in n and not n.endswith("/") and ("tvm/runtime" in n or "tvm/ffi" in n or "dlpack" in n or "dmlc" in n):
                rel = n.split("/include/", 1)[1]
                out = inc / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
PY
    rm -rf "$cache/wheel"
fi
