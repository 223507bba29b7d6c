"""``ssh://user@host:port``: the agent over an SSH exec channel (paramiko).

Host keys are checked by default against ``~/.ssh/known_hosts`` (plus ``?known_hosts=FILE``);
an unknown host is refused unless ``?insecure=1``. ``?key=FILE`` picks the private key,
``?root=DIR`` the agent's state directory on the device (default ``.edgekit`` in the home).
The agent bundle is uploaded over SFTP into ``ROOT/agent/<hash>`` (temporary name, then rename)
the first time a given agent version meets the device (``AgentTransport.start_agent``, shared with
adb and local). Every path that reaches the remote shell is quoted.
"""

from __future__ import annotations

import posixpath
import shlex
import time
from pathlib import Path
from typing import Any

from edgekit.device.errors import DeviceConnectionError, DeviceError, DeviceTimeout
from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session
from edgekit.device.transports.base import AgentTransport


class SSHChannel(Channel):
    def __init__(self, client: Any, chan: Any):
        self.client = client
        self.chan = chan

    def read(self, n: int, timeout: float) -> bytes:
        self.chan.settimeout(max(timeout, 0.001))
        try:
            data = self.chan.recv(n)
        except TimeoutError:
            return b""
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not data:
            raise ChannelClosed(f"ssh channel closed (exit status {self.chan.exit_status})")
        return data

    def write(self, data: bytes) -> None:
        try:
            self.chan.sendall(data)
        except (OSError, EOFError) as exc:
            raise ChannelClosed(str(exc)) from exc

    def close(self) -> None:
        try:
            self.chan.close()
        finally:
            self.client.close()


def connect_client(parts: Any, query: dict[str, str], timeout: float) -> Any:
    """An authenticated paramiko client, host key checked unless ``insecure=1``."""
    import paramiko

    client = paramiko.SSHClient()
    client.load_system_host_keys()
    if query.get("known_hosts"):
        client.load_host_keys(query["known_hosts"])
    insecure = query.get("insecure") in ("1", "true", "yes")
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if insecure else paramiko.RejectPolicy())
    host, port = parts.hostname or "localhost", parts.port or 22
    t0 = time.monotonic()
    try:
        client.connect(
            host,
            port=port,
            username=parts.username or None,
            password=parts.password or None,
            key_filename=query.get("key"),
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=not query.get("key"),
        )
    except paramiko.BadHostKeyException as exc:
        raise DeviceConnectionError(f"ssh://{host}:{port}: host key changed ({exc}); fix known_hosts") from exc
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise DeviceConnectionError(
                f"ssh://{host}:{port}: unknown host key; add it with `ssh-keyscan -p {port} {host} >> "
                f"~/.ssh/known_hosts`, pass ?known_hosts=FILE, or ?insecure=1 to skip the check"
            ) from exc
        if "banner" in str(exc).lower() or time.monotonic() - t0 >= timeout * 0.9:
            raise DeviceTimeout(f"ssh://{host}:{port}: no SSH answer within {timeout:g} s ({exc})") from exc
        raise DeviceConnectionError(f"ssh://{host}:{port}: {exc}") from exc
    except TimeoutError as exc:
        raise DeviceTimeout(f"ssh://{host}:{port}: no answer within {timeout:g} s; is the device up?") from exc
    except OSError as exc:
        raise DeviceConnectionError(f"ssh://{host}:{port}: cannot connect ({exc}); is the device up?") from exc
    return client


class SSHDevice(AgentTransport):
    """The device behind one authenticated paramiko client: SFTP for files, an exec channel for the agent."""

    def __init__(self, url: str, client: Any):
        self.url, self.client = url, client
        self.sftp = client.open_sftp()
        self.chan: Any = None

    def absolute_root(self, root: str) -> str:
        return root if root.startswith("/") else posixpath.join(self.sftp.normalize("."), root)

    def exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
            return True
        except OSError:
            return False

    def _mkdirs(self, path: str) -> None:
        if path in ("", "/") or self.exists(path):
            return
        self._mkdirs(posixpath.dirname(path))
        try:
            self.sftp.mkdir(path)
        except OSError:
            if not self.exists(path):  # not a concurrent mkdir
                raise

    def write_tree(self, directory: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            path = posixpath.join(directory, name)
            self._mkdirs(posixpath.dirname(path))
            with self.sftp.open(path, "wb") as f:
                f.write(data)

    def move_into_place(self, tmp: str, dest: str) -> None:
        try:
            self.sftp.posix_rename(tmp, dest)
        except OSError:  # another session installed it meanwhile: drop our copy
            self._exec(f"rm -rf {shlex.quote(tmp)}")

    def _exec(self, command: str) -> int:
        chan = self.client.get_transport().open_session(timeout=30)
        chan.exec_command(command)
        return chan.recv_exit_status()

    def launch(self, launcher: str, root: str, python: str, timeout: float) -> Session:
        self.sftp.close()
        cmd = f"exec {shlex.quote(python)} {shlex.quote(launcher)} --stdio --root {shlex.quote(root)}"
        self.chan = self.client.get_transport().open_session(timeout=timeout)
        self.chan.exec_command(cmd)
        return Session(SSHChannel(self.client, self.chan), self.url, timeout=timeout)

    def start_failed(self, exc: DeviceError) -> DeviceError:
        if not isinstance(exc, DeviceConnectionError):
            return exc
        err = b""
        while self.chan.recv_stderr_ready():
            err += self.chan.recv_stderr(65536)
        detail = err.decode(errors="replace").strip().splitlines()[-3:]
        return DeviceConnectionError(
            f"{self.url.split('?')[0]}: the agent did not start on the device (exit status {self.chan.exit_status}): "
            f"{' / '.join(detail) or exc}; the device needs python3 with numpy (set ?python=PATH otherwise)"
        )


def open_ssh(url: str, parts: Any, query: dict[str, str], timeout: float) -> Session:
    client = connect_client(parts, query, min(timeout, 30.0))
    try:
        device = SSHDevice(url, client)
        return device.start_agent(query.get("root", ".edgekit"), query.get("python", "python3"), timeout)
    except BaseException:
        client.close()
        raise


def known_hosts_line(host: str, port: int, key_file: str | Path) -> str:
    """A known_hosts line for a host key file (helper for tests and set-up)."""
    kind, b64 = Path(key_file).read_text().split()[:2]
    return f"[{host}]:{port} {kind} {b64}\n"
