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
from pathlib import Path
from typing import Any

from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session
from edgekit.device.transports.base import AgentTransport

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


class LocalDevice(AgentTransport):
    """This host as the device: the agent is a child process speaking over its stdin/stdout."""

    def __init__(self, url: str):
        self.url = url

    def absolute_root(self, root: str) -> str:
        return str(Path(root).expanduser().resolve())

    def exists(self, path: str) -> bool:
        return Path(path).is_file()

    def write_tree(self, directory: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            (Path(directory) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(directory) / name).write_bytes(data)

    def move_into_place(self, tmp: str, dest: str) -> None:
        try:
            os.rename(tmp, dest)
        except OSError:  # another session installed it first
            shutil.rmtree(tmp, ignore_errors=True)

    def launch(self, launcher: str, root: str, python: str, timeout: float) -> Session:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.Popen(
            [python, launcher, "--stdio", "--root", root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=root,
            env=env,
            start_new_session=True,
        )
        session = Session(ProcessChannel(proc), self.url, timeout=timeout)
        session.pid = proc.pid
        return session


def open_local(url: str, parts: Any, query: dict[str, str], timeout: float) -> Session:
    root = Path(query.get("root") or DEFAULT_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    return LocalDevice(url).start_agent(str(root), query.get("python", sys.executable), timeout)
