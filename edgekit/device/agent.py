"""The device agent: runs deployed artifacts and answers the host over the framed protocol.

It needs only Python 3 and numpy on the device, plus the runtime an artifact uses (TVM runtime,
LiteRT / tflite-runtime, onnxruntime, or edgekit's numpy reference executor, shipped with the
agent). It serves a fixed set of operations (hello, probe, upload, load, run, profile,
intermediates); it never executes a command sent by the host. Usage on the device::

    python3 -m edgekit.device.agent --root DIR (--stdio | --tcp HOST:PORT | --serial /dev/ttyX)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgekit.artifact import ArtifactError, read_manifest, sha256_file
from edgekit.device.protocol import (
    KIND_ACK,
    KIND_NAK,
    KIND_POLL,
    KIND_REQUEST,
    KIND_RESPONSE,
    PROTOCOL_VERSION,
    ChannelClosed,
    FrameReader,
    FrameTimeout,
    ProtocolError,
    decode_message,
    encode_frame,
    encode_message,
    pack_arrays,
    unpack_arrays,
)
from edgekit.device.runtimes import AgentError, LoadedModel, runtime_class

AGENT_VERSION = "2"  # 2: ACK/POLL frames
RUNTIME_MODULES = {
    "numpy": "numpy",
    "reference": "numpy",
    "tvm": "tvm",
    "litert": "ai_edge_litert",
    "tflite_runtime": "tflite_runtime",
    "onnxruntime": "onnxruntime",
}


def unpack_checked(path: Path, dest: Path) -> dict[str, Any]:
    """Extract an artifact's listed regular files one by one and verify each checksum.

    (Not ``tarfile.extractall(filter=...)``: Debian bookworm's Python 3.11.2 predates it.)
    """
    import tarfile

    manifest = read_manifest(path)
    names = set(manifest["files"])
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name == "manifest.json":
                continue
            if member.name not in names or not member.isfile() or member.name.startswith("/") or ".." in member.name:
                raise ArtifactError(f"{path}: unexpected member {member.name!r}")
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    for name, digest in manifest["files"].items():
        if not (dest / name).is_file() or sha256_file(dest / name) != digest:
            raise ArtifactError(f"{path}: checksum mismatch for {name}; the artifact is corrupt, rebuild it")
    return manifest


def peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


# ---- the agent ------------------------------------------------------------------------------


class Agent:
    """State of one agent process: its root directory, the loaded model, recent responses."""

    def __init__(self, root: Path, lock_timeout: float = 600.0):
        self.root = root
        self.cache = root / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.lock_timeout = lock_timeout
        self.model: LoadedModel | None = None
        self.model_sha = ""
        self.manifest: dict[str, Any] = {}
        self.uploads: dict[str, tuple[Path, str, int]] = {}
        self.recent: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    @contextlib.contextmanager
    def device_lock(self):
        """Serialise heavy work (deploy commit, load, run, profile) across agent processes."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AgentError("device busy: another run holds the device lock") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    # -- operations: each takes (request, blobs) and returns (response, blobs)
    def op_hello(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        return {"agent_version": AGENT_VERSION, "protocol": PROTOCOL_VERSION, "pid": os.getpid()}, []

    def op_probe(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        cpu = {}
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key in ("model name", "CPU part", "CPU implementer", "Hardware", "Model") and key not in cpu:
                    cpu[key] = val
        mem = {}
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(val.split()[0])
        runtimes = {}
        for name, module in RUNTIME_MODULES.items():
            runtimes[name] = importlib.util.find_spec(module) is not None
        from edgekit.device.runtimes.tvm_runner import find_runner

        runtimes["tvm_runner"] = find_runner() is not None  # 'tvm' artifacts without the tvm Python package
        return {
            "arch": platform.machine(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "mem_total_kib": mem.get("MemTotal"),
            "mem_available_kib": mem.get("MemAvailable"),
            "python": platform.python_version(),
            "os": platform.platform(),
            "runtimes": runtimes,
            "agent_version": AGENT_VERSION,
            "protocol": PROTOCOL_VERSION,
            "root": str(self.root),
            "current": self._current(),
        }, []

    def _current(self) -> str | None:
        try:
            return os.readlink(self.root / "current").rpartition("/")[2]
        except OSError:
            return None

    def _entry(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise AgentError(f"not a sha256: {sha!r}")
        return self.cache / sha

    def op_has(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        entry = self._entry(req["sha256"])
        return {"present": (entry / "manifest.json").is_file()}, []

    def op_activate(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """Make an already cached artifact ``current``."""
        entry = self._entry(req["sha256"])
        if not (entry / "manifest.json").is_file():
            raise AgentError("artifact is not in the device's cache; deploy it first")
        self._point_current(req["sha256"])
        return {"current": req["sha256"]}, []

    def op_put_begin(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        sha = req["sha256"]
        self._entry(sha)
        token = f"{sha[:16]}-{os.getpid()}-{len(self.uploads)}"
        tmp = self.cache / f".incoming-{token}"
        tmp.write_bytes(b"")
        self.uploads[token] = (tmp, sha, int(req["size"]))
        return {"token": token}, []

    def op_put_chunk(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        tmp, _, size = self.uploads[req["token"]]
        offset = int(req["offset"])
        if offset + len(blobs[0]) > size:
            raise AgentError("upload chunk past the announced size")
        fd = os.open(tmp, os.O_WRONLY)
        try:
            os.pwrite(fd, blobs[0], offset)
        finally:
            os.close(fd)
        return {"received": offset + len(blobs[0])}, []

    def op_put_commit(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """Verify the upload's checksum, unpack into a temporary dir, then rename into the cache."""
        tmp, sha, size = self.uploads.pop(req["token"])
        try:
            if tmp.stat().st_size != size or sha256_file(tmp) != sha:
                raise AgentError("upload checksum mismatch on the device (link corrupted the data); deploy again")
            entry = self._entry(sha)
            with self.device_lock():
                if not (entry / "manifest.json").is_file():
                    staging = self.cache / f".staging-{sha[:16]}-{os.getpid()}"
                    shutil.rmtree(staging, ignore_errors=True)
                    staging.mkdir()
                    os.replace(tmp, staging / "artifact.tar")
                    manifest = unpack_checked(staging / "artifact.tar", staging / "files")
                    # manifest.json last: its presence marks a complete entry
                    (staging / "manifest.json").write_text(json.dumps(manifest))
                    shutil.rmtree(entry, ignore_errors=True)
                    os.replace(staging, entry)
                self._point_current(sha)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return {"deployed": sha}, []

    def _point_current(self, sha: str) -> None:
        link = self.root / "current"
        tmp = self.root / f".current-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"cache/{sha}", tmp)
        os.replace(tmp, link)

    def op_clean_incoming(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """Remove upload leftovers of dead sessions (older than ``age_s``)."""
        removed = 0
        for p in self.cache.glob(".incoming-*"):
            if time.time() - p.stat().st_mtime > float(req.get("age_s", 60)):
                p.unlink()
                removed += 1
        return {"removed": removed}, []

    def op_load(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        entry = self._entry(req["sha256"])
        if not (entry / "manifest.json").is_file():
            raise AgentError("artifact is not deployed on this device; run `edgekit deploy` first")
        manifest = json.loads((entry / "manifest.json").read_text())
        runtime = manifest.get("runtime")
        model_class = runtime_class(runtime)
        if self.model is not None:
            self.model.close()
            self.model = None
        rss0 = current_rss_kib()
        with self.device_lock():
            t0 = time.perf_counter_ns()
            model_path = entry / "files" / manifest["model_file"]
            self.model = model_class(model_path, manifest, int(req.get("threads", 0)))
            load_ms = (time.perf_counter_ns() - t0) / 1e6
        self.model_sha, self.manifest = req["sha256"], manifest
        return {
            "load_ms": load_ms,
            "runtime": runtime,
            "rss_before_kib": rss0,
            "rss_after_kib": current_rss_kib() + self.model.extra_rss_kib(peak=False),
            "per_layer": self.model.per_layer,
        }, []

    def _loaded(self) -> LoadedModel:
        if self.model is None:
            raise AgentError("no model loaded")
        return self.model

    def op_run(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        model = self._loaded()
        inputs = unpack_arrays(req["inputs"], blobs)
        with self.device_lock():
            t0 = time.perf_counter_ns()
            outputs = model.run(inputs)
            ms = (time.perf_counter_ns() - t0) / 1e6
        out: list[bytes] = []
        peak = peak_rss_kib() + model.extra_rss_kib(peak=True)
        return {"outputs": pack_arrays(outputs, out), "time_ms": ms, "peak_rss_kib": peak}, out

    def op_profile(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        model = self._loaded()
        inputs = unpack_arrays(req["inputs"], blobs)
        runs, warmup = int(req["runs"]), int(req.get("warmup", 1))
        with self.device_lock():
            start = time.monotonic()
            timed = model.timed_runs(inputs, runs, warmup)  # a runner process times itself
            if timed is not None:
                warmup_ms, lat = timed
            else:
                t0 = time.perf_counter_ns()
                for _ in range(warmup):
                    model.run(inputs)
                warmup_ms = (time.perf_counter_ns() - t0) / 1e6
                lat = []
                for _ in range(runs):
                    t0 = time.perf_counter_ns()
                    model.run(inputs)
                    lat.append((time.perf_counter_ns() - t0) / 1e6)
            layers: dict[str, float] = {}
            if model.per_layer and req.get("per_layer", True):
                n = max(1, min(runs, model.layer_calls))
                for _ in range(n):
                    for k, v in model.run_timed_layers(inputs).items():
                        layers[k] = layers.get(k, 0.0) + v / n
            end = time.monotonic()
        return {
            "latencies_ms": lat,
            "warmup_ms": warmup_ms,
            "layers_ms": layers,
            "peak_rss_kib": peak_rss_kib() + model.extra_rss_kib(peak=True),
            "window": [start, end],
        }, []

    def op_intermediates(self, req: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        model = self._loaded()
        inputs = unpack_arrays(req["inputs"], blobs)
        with self.device_lock():
            tensors = model.intermediates(inputs)
        out: list[bytes] = []
        return {"tensors": pack_arrays(tensors, out)}, out

    # -- dispatch
    def handle(self, rid: int, payload: bytes) -> bytes:
        """The response frame for one request frame (a repeated id gets the cached response)."""
        if rid in self.recent:
            return self.recent[rid]
        try:
            req, blobs = decode_message(payload)
            handler = getattr(self, "op_" + str(req.get("op")), None)
            if handler is None:
                raise AgentError(f"unknown operation {req.get('op')!r}")
            resp, out = handler(req, blobs)
            resp["ok"] = True
        except AgentError as exc:
            resp, out = {"ok": False, "error": str(exc)}, []
        except Exception as exc:  # reported to the host, the agent keeps serving
            resp, out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
        frame = encode_frame(KIND_RESPONSE, rid, encode_message(resp, out))
        self.recent[rid] = frame
        while len(self.recent) > 8:
            self.recent.popitem(last=False)
        return frame


def serve(agent: Agent, read, write) -> None:
    """Answer frames until the stream closes. Damaged frames get a NAK so the host resends; a new
    request is acknowledged before it runs (so the host polls, not resends, while it waits); a poll
    gets the cached response again, or a NAK with its id when that request never arrived."""
    reader = FrameReader(read, gap_timeout=0.5)
    while True:
        try:
            kind, rid, payload = reader.read_frame(None)
        except ChannelClosed:
            return
        except FrameTimeout:
            continue
        except ProtocolError:
            write(encode_frame(KIND_NAK, 0, b""))
            continue
        if kind == KIND_POLL:
            cached = agent.recent.get(rid)
            write(cached if cached is not None else encode_frame(KIND_NAK, rid, b""))
            continue
        if kind != KIND_REQUEST:
            continue
        if payload == b"" and rid == 0:
            continue
        if rid not in agent.recent:
            write(encode_frame(KIND_ACK, rid, b""))
        write(agent.handle(rid, payload))


def _fd_reader(fd: int):
    import select

    def read(n: int, timeout: float) -> bytes:
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return b""
        try:
            data = os.read(fd, n)
        except OSError as exc:  # a pty whose other end went away
            raise ChannelClosed(str(exc)) from exc
        if not data:
            raise ChannelClosed("end of stream")
        return data

    return read


def _fd_writer(fd: int):
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    return write


def serve_stdio(agent: Agent) -> None:
    # keep stray prints (e.g. from a runtime) off the protocol stream
    in_fd, out_fd = os.dup(0), os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    serve(agent, _fd_reader(in_fd), _fd_writer(out_fd))


def serve_serial(agent: Agent, device: str) -> None:
    import termios
    import tty

    while True:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
        with contextlib.suppress(termios.error):
            tty.setraw(fd)
        try:
            serve(agent, _fd_reader(fd), _fd_writer(fd))
        finally:
            os.close(fd)
        time.sleep(0.2)


def serve_tcp(root: Path, address: str, port_file: str | None) -> None:
    host, _, port = address.rpartition(":")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host or "127.0.0.1", int(port)))
    srv.listen(8)
    if port_file:
        Path(port_file).write_text(str(srv.getsockname()[1]))

    def session(conn: socket.socket) -> None:
        def read(n: int, timeout: float) -> bytes:
            conn.settimeout(timeout)
            try:
                data = conn.recv(n)
            except TimeoutError:
                return b""
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not data:
                raise ChannelClosed("connection closed")
            return data

        with conn:
            with contextlib.suppress(OSError):
                serve(Agent(root), read, conn.sendall)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=session, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="edgekit device agent")
    p.add_argument("--root", default=os.path.expanduser("~/.edgekit"), help="agent state: cache, lock")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--stdio", action="store_true", help="serve one session on stdin/stdout (ssh, adb, local)")
    g.add_argument("--tcp", metavar="HOST:PORT", help="serve TCP connections")
    g.add_argument("--serial", metavar="DEVICE", help="serve a serial line (tty)")
    p.add_argument("--port-file", help="with --tcp: write the bound port here")
    args = p.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.stdio:
        serve_stdio(Agent(root))
    elif args.serial:
        serve_serial(Agent(root), args.serial)
    else:
        serve_tcp(root, args.tcp, args.port_file)
    return 0


def bundle_files() -> dict[str, Path]:
    """The files the device needs (path in the bundle: path here); no edgekit install there."""
    pkg = Path(__file__).resolve().parents[1]
    return {
        "edgekit/artifact.py": pkg / "artifact.py",
        "edgekit/errors.py": pkg / "errors.py",
        "edgekit/qmodel.py": pkg / "qmodel.py",
        "edgekit/reference.py": pkg / "reference.py",
        "edgekit/quant/arith.py": pkg / "quant" / "arith.py",
        **{f"edgekit/llm/{n}": pkg / "llm" / n for n in ("__init__.py", "model.py", "qlm.py")},  # runtime "lm"
        "edgekit/device/protocol.py": pkg / "device" / "protocol.py",
        "edgekit/device/agent.py": pkg / "device" / "agent.py",
        **{f"edgekit/device/runtimes/{f.name}": f for f in sorted((pkg / "device" / "runtimes").glob("*.py"))},
    }


AGENT_LAUNCHER = "edgekit_agent.py"
BUNDLE_STUBS = {
    AGENT_LAUNCHER: b"import os, sys\nsys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
    b"from edgekit.device.agent import main\nsys.exit(main())\n",
    "edgekit/__init__.py": b'"""edgekit device-side subset (agent bundle)."""\n',
    "edgekit/quant/__init__.py": b"",
    "edgekit/device/__init__.py": b"",
}


def bundle_contents() -> dict[str, bytes]:
    files = {name: path.read_bytes() for name, path in bundle_files().items()}
    files.update(BUNDLE_STUBS)
    return dict(sorted(files.items()))


def bundle_hash() -> str:
    h = hashlib.sha256()
    for name, data in bundle_contents().items():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
