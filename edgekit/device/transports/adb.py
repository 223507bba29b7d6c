"""``adb://SERIAL``: the agent on an Android-style device through the real ``adb`` client.

The bundle is pushed with ``adb push`` (temporary name, then ``mv``) into
``ROOT/agent/<hash>``; the agent runs on the device as a TCP server on its loopback, started
with ``adb shell`` and reached through ``adb forward`` (legacy adb shells lose exit codes and
cannot half-close stdin, so the protocol does not ride on the shell stream). A dead agent is
restarted on the next connection. ``adb://HOST:PORT`` is ``adb connect``-ed first.
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

from edgekit.device.agent import AGENT_LAUNCHER, bundle_contents, bundle_hash
from edgekit.device.errors import DeviceConnectionError, DeviceError, DeviceTimeout
from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session

DEFAULT_ROOT = "/data/local/tmp/edgekit"


def adb(serial: str | None, *args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run the adb client; its output as text."""
    exe = shutil.which("adb")
    if exe is None:
        raise DeviceConnectionError("the `adb` client is not installed: apt-get install adb")
    cmd = [exe, *(["-s", serial] if serial else []), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise DeviceTimeout(f"`adb {' '.join(args[:2])}` did not finish within {timeout:g} s") from exc
    if check and res.returncode != 0:
        raise DeviceConnectionError(f"`adb {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def shell(serial: str, command: str, timeout: float = 60.0) -> str:
    return adb(serial, "shell", command, timeout=timeout)


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


def install_bundle_adb(serial: str, root: str) -> str:
    dest = f"{root}/agent/{bundle_hash()}"
    if "present" in shell(serial, f"test -f {shlex.quote(dest + '/' + AGENT_LAUNCHER)} && echo present"):
        return dest
    tmp_remote = f"{root}/agent/.tmp-{int(time.time() * 1000)}"
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in bundle_contents().items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        shell(serial, f"mkdir -p {shlex.quote(tmp_remote)}")
        for name in bundle_contents():
            adb(serial, "push", str(Path(tmp) / name), f"{tmp_remote}/{name}", timeout=120)
    shell(serial, f"mv {shlex.quote(tmp_remote)} {shlex.quote(dest)} 2>/dev/null || rm -rf {shlex.quote(tmp_remote)}")
    return dest


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
    root = query.get("root", DEFAULT_ROOT)
    bundle = install_bundle_adb(serial, root)
    port_file = f"{root}/agent.port.{bundle_hash()}"
    port_text = shell(serial, f"cat {shlex.quote(port_file)} 2>/dev/null").strip()
    if port_text.isdigit():
        session = _try_session(url, serial, int(port_text), timeout)
        if session is not None:
            return session
    python = query.get("python", "python3")
    q = shlex.quote
    start = (
        f"rm -f {q(port_file)}; cd {q(root)} && nohup {q(python)} {q(bundle + '/' + AGENT_LAUNCHER)} "
        f"--tcp 127.0.0.1:0 --port-file {q(port_file)} --root {q(root)} >{q(root + '/agent.log')} 2>&1 </dev/null &"
    )
    shell(serial, start)
    deadline = time.monotonic() + min(timeout, 60.0)
    while time.monotonic() < deadline:
        port_text = shell(serial, f"cat {q(port_file)} 2>/dev/null").strip()
        if port_text.isdigit():
            session = _try_session(url, serial, int(port_text), timeout)
            if session is not None:
                return session
        time.sleep(0.5)
    log = shell(serial, f"tail -5 {q(root + '/agent.log')} 2>/dev/null").strip()
    raise DeviceTimeout(f"{url}: the agent did not start on the device within {min(timeout, 60.0):g} s: {log}")
