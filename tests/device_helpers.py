"""Shared pieces of the device runner tests: real models and data, a noisy line, process helpers."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgekit.device.session import Channel

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESNET8_ONNX = DATA / "resnet8_cifar10_fp32.onnx"
LITERT_INT8 = DATA / "mlperf_tiny_resnet8_int8_reference.tflite"


def quantized_resnet8():
    """The real ResNet-8 quantized by edgekit on 200 calibration images."""
    import edgekit

    calib = np.load(DATA / "cifar10_calib_train1000.npz")["x"][:200].astype(np.float32)
    return edgekit.quantize(str(RESNET8_ONNX), calib)


def test_subset(path: Path, n: int, labels: bool = True) -> Path:
    """``n`` CIFAR-10 test images (and labels) as an .npz, every (10000 // n)-th one: the file is sorted
    by class, so the first ``n`` would all be airplanes."""
    d = np.load(DATA / "cifar10_test.npz")
    step = max(1, len(d["x"]) // n)
    arrays = {"x": d["x"][::step][:n]}
    if labels:
        arrays["y"] = d["y"][::step][:n]
    np.savez(path, **arrays)
    return path


test_subset.__test__ = False  # not a test, despite the name


def tampered_artifact(qm, layer_index: int, out: Path) -> tuple[Path, str]:
    """A reference artifact whose model computes one conv layer differently (bias +3) while its
    manifest claims the original model: stands in for a device runtime with a wrong kernel."""
    import copy
    import tempfile

    from edgekit.artifact import pack_artifact
    from edgekit.device.artifacts import io_specs

    bad = copy.deepcopy(qm)
    convs = [n for n in bad.nodes if n.op == "conv2d"]
    node = convs[layer_index]
    bias = node.params["bias"]
    bad.constants[bias] = bad.constants[bias] + np.int32(3 * 1000)
    inputs, outputs = io_specs(qm)
    with tempfile.TemporaryDirectory() as tmp:
        ekq = bad.save(Path(tmp) / "model.ekq")
        manifest = {
            "runtime": "reference",
            "model_file": "model.ekq",
            "target": "numpy",
            "model_hash": qm.content_hash(),
            "inputs": inputs,
            "outputs": outputs,
        }
        pack_artifact(out, manifest, {"model.ekq": ekq})
    return out, node.name


class NoisyChannel(Channel):
    """Wraps a real channel and damages bytes in both directions: flips bits, drops bytes."""

    def __init__(self, inner: Channel, *, flip: float = 0.0, drop: float = 0.0, seed: int = 0):
        self.inner, self.flip, self.drop = inner, flip, drop
        self.rng = random.Random(seed)
        self.flipped = self.dropped = 0

    def _damage(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            r = self.rng.random()
            if r < self.drop:
                self.dropped += 1
                continue
            if r < self.drop + self.flip:
                b ^= 1 << self.rng.randrange(8)
                self.flipped += 1
            out.append(b)
        return bytes(out)

    def read(self, n: int, timeout: float) -> bytes:
        return self._damage(self.inner.read(n, timeout))

    def write(self, data: bytes) -> None:
        self.inner.write(self._damage(data))

    def close(self) -> None:
        self.inner.close()


class CutAfter(Channel):
    """Passes ``limit`` written bytes through, then the link 'drops' (closes) mid-transfer."""

    def __init__(self, inner: Channel, limit: int):
        self.inner, self.limit, self.sent = inner, limit, 0

    def read(self, n: int, timeout: float) -> bytes:
        return self.inner.read(n, timeout)

    def write(self, data: bytes) -> None:
        from edgekit.device.protocol import ChannelClosed

        if self.sent + len(data) > self.limit:
            self.inner.write(data[: max(0, self.limit - self.sent)])
            self.inner.close()
            raise ChannelClosed("link dropped (test)")
        self.sent += len(data)
        self.inner.write(data)

    def close(self) -> None:
        self.inner.close()


def kill_later(pid: int, delay: float) -> None:
    """SIGKILL ``pid`` after ``delay`` seconds (from a thread)."""
    import threading

    def go() -> None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threading.Thread(target=go, daemon=True).start()


class FrameFaults(Channel):
    """Wraps a real channel and damages chosen whole frames, deterministically.

    ``out`` / ``back``: {frame number (1-based, host -> agent / agent -> host): fault}, fault one of
    ``"magic"`` (flip a bit of the magic: the frame vanishes without a trace, nothing to NAK),
    ``"header"`` (flip a bit of the length: header CRC fails), ``"payload"`` (flip a payload bit),
    ``"drop"`` (the whole frame is lost), ``"cut"`` (its last byte is lost). Frames are counted
    by parsing the (clean) stream, so the count is exact whatever the read sizes.
    """

    def __init__(self, inner: Channel, *, out: dict[int, str] | None = None, back: dict[int, str] | None = None):
        self.inner, self.out, self.back = inner, dict(out or {}), dict(back or {})
        self.sent = self.received = 0
        self._pending = bytearray()  # agent -> host bytes not yet parsed into a whole frame
        self.kinds_back: list[int] = []  # kind of every frame the agent sent, in order
        self.damaged: list[tuple[str, int, str]] = []

    @staticmethod
    def _damage(frame: bytes, fault: str) -> bytes:
        from edgekit.device.protocol import HEADER_SIZE

        b = bytearray(frame)
        if fault == "magic":
            b[1] ^= 0x04
        elif fault == "header":
            b[11] ^= 0x01
        elif fault == "payload":
            b[HEADER_SIZE] ^= 0x10
        elif fault == "drop":
            return b""
        elif fault == "cut":
            return bytes(b[:-1])
        return bytes(b)

    def write(self, data: bytes) -> None:
        self.sent += 1  # Session writes one whole frame per call
        fault = self.out.get(self.sent)
        if fault:
            self.damaged.append(("out", self.sent, fault))
            data = self._damage(data, fault)
        if data:
            self.inner.write(data)

    def read(self, n: int, timeout: float) -> bytes:
        import struct

        from edgekit.device.protocol import HEADER_SIZE

        chunk = self.inner.read(n, timeout)
        self._pending += chunk
        out = bytearray()
        while len(self._pending) >= HEADER_SIZE:
            kind = self._pending[3]
            (length,) = struct.unpack(">I", self._pending[8:12])
            total = HEADER_SIZE + length + 4
            if len(self._pending) < total:
                break
            frame = bytes(self._pending[:total])
            del self._pending[:total]
            self.received += 1
            self.kinds_back.append(kind)
            fault = self.back.get(self.received)
            if fault:
                self.damaged.append(("back", self.received, fault))
                frame = self._damage(frame, fault)
            out += frame
        return bytes(out)

    def close(self) -> None:
        self.inner.close()


def tampered_tvm_artifact(qm, layer_index: int, target: str, out: Path) -> tuple[Path, str]:
    """A compiled (TVM) artifact whose library computes one conv layer differently (bias +3000) while
    its manifest and reference.ekq claim the original model: stands in for a miscompiled kernel."""
    import copy
    import tarfile
    import tempfile

    from edgekit.artifact import pack_artifact, read_manifest
    from edgekit.compile import compile_model

    bad = copy.deepcopy(qm)
    node = [n for n in bad.nodes if n.op == "conv2d"][layer_index]
    bad.constants[node.params["bias"]] = bad.constants[node.params["bias"]] + np.int32(3000)
    with tempfile.TemporaryDirectory() as tmp:
        built = compile_model(bad, target, Path(tmp) / "bad.tar", verify=False).path
        manifest = read_manifest(built)
        with tarfile.open(built) as tar:
            tar.extract("model.so", tmp, filter="data")
        manifest["model_hash"] = qm.content_hash()
        files = {"model.so": Path(tmp) / "model.so", "reference.ekq": qm.save(Path(tmp) / "reference.ekq")}
        pack_artifact(out, {k: v for k, v in manifest.items() if k != "files"}, files)
    return out, node.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def start_module(args: list[str]) -> subprocess.Popen:
    """``python -m ARGS`` (a TVM RPC tracker or server) in its own process group: its forked workers
    are ended with it by ``stop_group``."""
    return subprocess.Popen(
        [sys.executable, "-m", *args], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
