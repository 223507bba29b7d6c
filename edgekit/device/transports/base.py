"""The step every installing transport shares: put the agent bundle on the device, start it, greet it.

A transport says how to reach the device's files and how to launch a process there
(``AgentTransport``'s abstract methods); ``start_agent`` does the rest the same way for all:
the bundle goes to ``ROOT/agent/<bundle hash>`` under a temporary name and is renamed into place
(skipped when that version is already there; a concurrent session that wins the race is fine),
then the agent is launched and must answer ``hello``.
"""

from __future__ import annotations

import posixpath
import uuid

from edgekit.device.agent import AGENT_LAUNCHER, bundle_contents, bundle_hash
from edgekit.device.errors import DeviceError
from edgekit.device.session import Session


class AgentTransport:
    """One device reached by one transport (ssh, adb, local). Paths are POSIX paths on the device."""

    url: str

    # -- what a transport provides
    def absolute_root(self, root: str) -> str:
        """``root`` made absolute on the device (relative roots are under the login's home)."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def write_tree(self, directory: str, files: dict[str, bytes]) -> None:
        """Create ``directory`` (and parents) and write ``files`` (relative paths) under it."""
        raise NotImplementedError

    def move_into_place(self, tmp: str, dest: str) -> None:
        """Rename directory ``tmp`` to ``dest``; if ``dest`` appeared meanwhile, remove ``tmp`` instead."""
        raise NotImplementedError

    def launch(self, launcher: str, root: str, python: str, timeout: float) -> Session:
        """Start (or reach an already running) agent; a session that may or may not have said hello."""
        raise NotImplementedError

    def start_failed(self, exc: DeviceError) -> DeviceError:
        """The error to raise when the launched agent does not answer (with what the transport knows)."""
        return exc

    # -- the shared step
    def install_bundle(self, root: str) -> str:
        """The agent bundle's directory on the device, uploaded if this version is missing."""
        dest = posixpath.join(root, "agent", bundle_hash())
        if self.exists(posixpath.join(dest, AGENT_LAUNCHER)):
            return dest
        tmp = posixpath.join(root, "agent", f".tmp-{uuid.uuid4().hex}")
        self.write_tree(tmp, bundle_contents())
        self.move_into_place(tmp, dest)
        return dest

    def start_agent(self, root: str, python: str, timeout: float) -> Session:
        """Install the bundle if needed, launch the agent, and greet it."""
        root = self.absolute_root(root)
        bundle = self.install_bundle(root)
        session = self.launch(posixpath.join(bundle, AGENT_LAUNCHER), root, python, timeout)
        if not session.info:
            try:
                session.hello(timeout=min(timeout, 60.0))
            except DeviceError as exc:
                err = self.start_failed(exc)  # before closing: it may read what the link still holds
                session.close()
                raise err from exc
        return session
