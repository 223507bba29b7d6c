"""``adb://SERIAL``: the agent on an Android-style device through the real ``adb`` client.

The bundle is pushed with ``adb push`` (temporary name, then ``mv``) into
``ROOT/agent/<hash>`` (``AgentTransport.start_agent``, shared with ssh and local); the agent runs
on the device as a TCP server on its loopback, started with ``adb shell`` and reached through
``adb forward`` (legacy adb shells cannot half-close stdin, so the protocol does not ride on the
shell stream). Shell commands' exit codes come from the shell_v2 protocol where the device has it,
else from a status line the command prints. A dead agent is restarted on the next connection.
``adb://HOST:PORT`` is ``adb connect``-ed first.
``?root=DIR`` (default ``/data/local/tmp/edgekit``), ``?python=python3``.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from edgekit.device.agent import bundle_hash
from edgekit.device.errors import DeviceConnectionError, DeviceError, DeviceTimeout
from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session
from edgekit.device.transports.base import AgentTransport

DEFAULT_ROOT = "/data/local/tmp/edgekit"


def _run(serial: str | None, args: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess:
    exe = shutil.which("adb")
    if exe is None:
        raise DeviceConnectionError("the `adb` client is not installed: apt-get install adb")
    cmd = [exe, *(["-s", serial] if serial else []), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DeviceTimeout(f"`adb {' '.join(args[:2])}` did not finish within {timeout:g} s") from exc


def adb(serial: str | None, *args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run the adb client; its output as text."""
    res = _run(serial, args, timeout)
    if check and res.returncode != 0:
        raise DeviceConnectionError(f"`adb {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


_FEATURES: dict[str, frozenset[str]] = {}
_STATUS_MARK = "__edgekit_exit_status="


def features(serial: str) -> frozenset[str]:
    """The device's adb features (``shell_v2``: shell exit codes and separate stderr)."""
    if serial not in _FEATURES:
        out = adb(serial, "features", timeout=30, check=False)
        _FEATURES[serial] = frozenset(f.strip() for f in out.replace("\n", ",").split(",") if f.strip())
    return _FEATURES[serial]


def shell(serial: str, command: str, timeout: float = 60.0, check: bool = True) -> tuple[int, str]:
    """Run ``command`` in the device's shell: (exit status, stdout). With shell_v2 the status is
    ``adb shell``'s own; a legacy shell loses it, so there the command runs in a subshell (an ``exit``
    in it ends only that) followed by a line that prints its status."""
    if "shell_v2" in features(serial):
        res = _run(serial, ("shell", command), timeout)
        status, out, err = res.returncode, res.stdout, res.stderr
    else:
        # -x: the legacy protocol even where the client could do better (what such a device gets anyway)
        res = _run(serial, ("shell", "-x", f"(\n{command}\n)\necho {_STATUS_MARK}$?"), timeout)
        out, _, tail = res.stdout.rpartition(_STATUS_MARK)
        status = int(tail.strip()) if tail.strip().isdigit() else (res.returncode or 255)
        out, err = (out if _STATUS_MARK in res.stdout else res.stdout), res.stderr
    if check and status != 0:
        detail = (err or out).strip().splitlines()[-3:]
        raise DeviceConnectionError(f"adb://{serial}: `{command}` exited with {status}: {' / '.join(detail)}")
    return status, out


def list_devices() -> list[dict[str, str]]:
    """``adb devices -l`` as dicts (serial, state, and the key:value details)."""
    if shutil.which("adb") is None:
        return []
    out = adb(None, "devices", "-l", timeout=30)
    devices = []
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2:
            d = {"serial": fields[0], "state": fields[1]}
            d.update(f.split(":", 1) for f in fields[2:] if ":" in f)
            devices.append(d)
    return devices


class SocketChannel(Channel):
    def __init__(self, sock: socket.socket, on_close=None):
        self.sock = sock
        self.on_close = on_close

    def read(self, n: int, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(n)
        except TimeoutError:
            return b""
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not data:
            raise ChannelClosed("connection closed")
        return data

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def close(self) -> None:
        self.sock.close()
        if self.on_close:
            self.on_close()


def ensure_connected(serial: str) -> None:
    states = {d["serial"]: d["state"] for d in list_devices()}
    if states.get(serial) == "device":
        return
    if ":" in serial:
        out = adb(None, "connect", serial, timeout=30)
        if "connected" not in out:
            raise DeviceConnectionError(f"adb connect {serial}: {out.strip()}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if {d["serial"]: d["state"] for d in list_devices()}.get(serial) == "device":
                return
            time.sleep(0.2)
    raise DeviceConnectionError(
        f"adb device {serial!r} is not available (state {states.get(serial, 'absent')}); see `edgekit devices`"
    )


class AdbDevice(AgentTransport):
    """A device behind the real ``adb`` client: push for files, the agent as a TCP server on the
    device's loopback (started with ``adb shell``) reached through ``adb forward``."""

    def __init__(self, url: str, serial: str):
        self.url, self.serial = url, serial
        self.log = ""

    def absolute_root(self, root: str) -> str:
        q = shlex.quote
        return shell(self.serial, f"mkdir -p {q(root)} && cd {q(root)} && pwd")[1].strip().splitlines()[-1]

    def exists(self, path: str) -> bool:
        return shell(self.serial, f"test -f {shlex.quote(path)}", check=False)[0] == 0

    def write_tree(self, directory: str, files: dict[str, bytes]) -> None:
        shell(self.serial, f"mkdir -p {shlex.quote(directory)}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
                adb(self.serial, "push", str(Path(tmp) / name), f"{directory}/{name}", timeout=120)

    def move_into_place(self, tmp: str, dest: str) -> None:
        q = shlex.quote
        shell(self.serial, f"if [ -e {q(dest)} ]; then rm -rf {q(tmp)}; else mv {q(tmp)} {q(dest)}; fi")

    def launch(self, launcher: str, root: str, python: str, timeout: float) -> Session:
        """Reach the agent this bundle left running, or start one and wait for its port file."""
        q = shlex.quote
        port_file = f"{root}/agent.port.{bundle_hash()}"
        status, port_text = shell(self.serial, f"cat {q(port_file)}", check=False)
        if status == 0 and port_text.strip().isdigit():
            session = _try_session(self.url, self.serial, int(port_text), timeout)
            if session is not None:
                return session
        shell(
            self.serial,
            f"rm -f {q(port_file)}; cd {q(root)} && nohup {q(python)} {q(launcher)} --tcp 127.0.0.1:0 "
            f"--port-file {q(port_file)} --root {q(root)} >{q(root + '/agent.log')} 2>&1 </dev/null &",
        )
        deadline = time.monotonic() + min(timeout, 60.0)
        while time.monotonic() < deadline:
            status, port_text = shell(self.serial, f"cat {q(port_file)}", check=False)
            if status == 0 and port_text.strip().isdigit():
                session = _try_session(self.url, self.serial, int(port_text), timeout)
                if session is not None:
                    return session
            time.sleep(0.5)
        log = shell(self.serial, f"tail -5 {q(root + '/agent.log')}", check=False)[1].strip()
        raise DeviceTimeout(f"{self.url}: the agent did not start on the device within {min(timeout, 60.0):g} s: {log}")


def _try_session(url: str, serial: str, device_port: int, timeout: float) -> Session | None:
    out = adb(serial, "forward", "tcp:0", f"tcp:{device_port}", timeout=30)
    local_port = int(out.strip().splitlines()[-1])

    def remove_forward() -> None:
        adb(serial, "forward", "--remove", f"tcp:{local_port}", timeout=30, check=False)

    sock = socket.create_connection(("127.0.0.1", local_port), timeout=10)
    session = Session(SocketChannel(sock, remove_forward), url, timeout=timeout)
    try:
        session.hello(timeout=min(timeout, 20.0))
        return session
    except DeviceError:
        session.close()
        return None


def open_adb(url: str, parts: Any, query: dict[str, str], timeout: float) -> Session:
    serial = parts.netloc or parts.path.lstrip("/")
    if not serial:
        raise DeviceConnectionError("adb:// needs a device serial, e.g. adb://emulator-5554; see `edgekit devices`")
    ensure_connected(serial)
    device = AdbDevice(url, serial)
    return device.start_agent(query.get("root", DEFAULT_ROOT), query.get("python", "python3"), timeout)
