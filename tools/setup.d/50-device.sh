#!/usr/bin/env bash
# System packages for the device runner and the emulated Raspberry Pi (tools/emulated-pi):
# qemu-user for aarch64, debootstrap for the rootfs, socat for pty pairs, the real adb client,
# an ssh client. Idempotent and quiet; skipped where we are not root (a developer's laptop).
set -euo pipefail
pkgs=(qemu-user-static binfmt-support debootstrap socat adb openssh-client zstd)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: device runner needs: ${missing[*]} (run as root to install)" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Build the emulated Pi's aarch64 rootfs once per machine (cached under ~/.cache/edgekit, keyed by
# recipe; a few minutes the first time, instant after). A failure here is reported, not fatal:
# the device tests will say what is wrong.
if [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    (cd "$here" && python3 -m emulated_pi.rootfs >/dev/null) || echo "setup: emulated Pi rootfs build failed (see above)" >&2
fi
