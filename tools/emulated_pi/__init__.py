"""Helpers for ``tools/emulated-pi``: an aarch64 Debian rootfs under qemu-user acting as a Raspberry Pi."""
