"""Transports, one per file, chosen by the device URL's scheme.

``local://[?root=DIR]``, ``ssh://user@host:port[?key=..&known_hosts=..&root=..]``, ``adb://SERIAL``,
``serial:///dev/ttyUSB0?baud=921600``, ``rpc://tracker:port/key`` (TVM RPC).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgekit.device.errors import DeviceURLError

SCHEMES = ("local", "ssh", "adb", "serial", "rpc")


def parse_url(url: str) -> tuple[str, Any, dict[str, str]]:
    """(scheme, split URL, query as a flat dict); rejects unknown schemes with the list of known ones."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise DeviceURLError(
            f"unknown device URL {url!r}: use one of local://, ssh://user@host:port, adb://SERIAL, "
            f"serial:///dev/ttyUSB0?baud=921600, rpc://tracker:port/key"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return parts.scheme, parts, query


def open_session(url: str, *, timeout: float = 60.0):
    """Connect to the device's agent (installing it where the transport can) and say hello."""
    scheme, parts, query = parse_url(url)
    if scheme == "local":
        from edgekit.device.transports.local import open_local

        return open_local(url, parts, query, timeout)
    if scheme == "ssh":
        from edgekit.device.transports.ssh import open_ssh

        return open_ssh(url, parts, query, timeout)
    if scheme == "serial":
        from edgekit.device.transports.serial_line import open_serial

        return open_serial(url, parts, query, timeout)
    if scheme == "adb":
        from edgekit.device.transports.adb import open_adb

        return open_adb(url, parts, query, timeout)
    from edgekit.device.transports.rpc import open_rpc

    return open_rpc(url, parts, query, timeout)
