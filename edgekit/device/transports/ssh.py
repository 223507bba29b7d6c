"""``ssh://user@host:port``: the agent over an SSH exec channel (paramiko).

Host keys are checked by default against ``~/.ssh/known_hosts`` (plus ``?known_hosts=FILE``);
an unknown host is refused unless ``?insecure=1``. ``?key=FILE`` picks the private key,
``?root=DIR`` the agent's state directory on the device (default ``.edgekit`` in the home).
The agent bundle is uploaded over SFTP into ``ROOT/agent/<hash>`` (temporary name, then rename)
the first time a given agent version meets the device. Every path that reaches the remote
shell is quoted.
"""

from __future__ import annotations

import posixpath
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

from edgekit.device.agent import AGENT_LAUNCHER, bundle_contents, bundle_hash
from edgekit.device.errors import DeviceConnectionError, DeviceTimeout
from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session


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


def install_bundle_sftp(client: Any, root: str) -> str:
    """Upload the agent bundle if this version is missing; returns its directory on the device."""
    sftp = client.open_sftp()
    try:
        home = sftp.normalize(".")
        root_abs = root if root.startswith("/") else posixpath.join(home, root)
        dest = posixpath.join(root_abs, "agent", bundle_hash())
        try:
            sftp.stat(posixpath.join(dest, AGENT_LAUNCHER))
            return dest
        except OSError:
            pass
        for d in (root_abs, posixpath.join(root_abs, "agent")):
            try:
                sftp.mkdir(d)
            except OSError:
                pass
        tmp = posixpath.join(root_abs, "agent", f".tmp-{uuid.uuid4().hex}")
        made = set()
        for name, data in bundle_contents().items():
            parent = posixpath.dirname(posixpath.join(tmp, name))
            chain = []
            while parent not in made and parent != posixpath.dirname(tmp):
                chain.append(parent)
                parent = posixpath.dirname(parent)
            for d in reversed(chain):
                sftp.mkdir(d)
                made.add(d)
            with sftp.open(posixpath.join(tmp, name), "wb") as f:
                f.write(data)
        try:
            sftp.posix_rename(tmp, dest)
        except OSError:  # another session installed it meanwhile
            pass
        return dest
    finally:
        sftp.close()


def open_ssh(url: str, parts: Any, query: dict[str, str], timeout: float) -> Session:
    client = connect_client(parts, query, min(timeout, 30.0))
    try:
        root = query.get("root", ".edgekit")
        bundle = install_bundle_sftp(client, root)
        root_abs = posixpath.join(posixpath.dirname(posixpath.dirname(bundle)))
        python = query.get("python", "python3")
        cmd = (
            f"exec {shlex.quote(python)} {shlex.quote(posixpath.join(bundle, AGENT_LAUNCHER))} --stdio "
            f"--root {shlex.quote(root_abs)}"
        )
        chan = client.get_transport().open_session(timeout=timeout)
        chan.exec_command(cmd)
        session = Session(SSHChannel(client, chan), url, timeout=timeout)
        try:
            session.hello(timeout=min(timeout, 60.0))
        except DeviceConnectionError as exc:
            err = b""
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            detail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise DeviceConnectionError(
                f"{url.split('?')[0]}: the agent did not start on the device (exit status {chan.exit_status}): "
                f"{' / '.join(detail) or exc}; the device needs python3 with numpy (set ?python=PATH otherwise)"
            ) from exc
        return session
    except BaseException:
        client.close()
        raise


def known_hosts_line(host: str, port: int, key_file: str | Path) -> str:
    """A known_hosts line for a host key file (helper for tests and set-up)."""
    kind, b64 = Path(key_file).read_text().split()[:2]
    return f"[{host}]:{port} {kind} {b64}\n"
