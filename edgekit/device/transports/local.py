"""``local://``: the agent as a child process of the host, speaking over its stdin/stdout.

Runs the same agent bundle a device gets (installed under ``root``), so it exercises the
bundle too. ``local://?root=DIR`` picks the agent's state directory.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgekit.device.agent import AGENT_LAUNCHER, bundle_contents, bundle_hash
from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session

DEFAULT_ROOT = Path.home() / ".cache" / "edgekit" / "local-device"


class ProcessChannel(Channel):
    """stdin/stdout pipes of a child process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        self.rfd = proc.stdout.fileno()
        self.wfd = proc.stdin.fileno()

    def read(self, n: int, timeout: float) -> bytes:
        r, _, _ = select.select([self.rfd], [], [], timeout)
        if not r:
            return b""
        data = os.read(self.rfd, n)
        if not data:
            raise ChannelClosed(f"agent exited (status {self.proc.poll()})")
        return data

    def write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.wfd, view) :]
        except BrokenPipeError as exc:
            raise ChannelClosed("agent exited") from exc

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def install_bundle_locally(root: Path) -> Path:
    """The agent bundle under ``root/agent/<hash>``, written to a temporary dir then renamed."""
    dest = root / "agent" / bundle_hash()
    if (dest / AGENT_LAUNCHER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    for name, data in bundle_contents().items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    try:
        os.rename(tmp, dest)
    except OSError:  # another session installed it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def open_local(url: str, parts: Any, query: dict[str, str], timeout: float) -> Session:
    root = Path(query.get("root") or DEFAULT_ROOT)
    bundle = install_bundle_locally(root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, str(bundle / AGENT_LAUNCHER), "--stdio", "--root", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=root,
        env=env,
        start_new_session=True,
    )
    session = Session(ProcessChannel(proc), url, timeout=timeout)
    session.pid = proc.pid
    session.hello(timeout=min(timeout, 30.0))
    return session
