"""The host side of the agent protocol: a byte ``Channel`` and a ``Session`` that calls the agent.

Every request carries a fresh id; a damaged or lost frame (detected by CRC, a NAK from the agent,
a frame cut short, or silence where an ACK or a response was due) is resent or polled for, and the
agent answers a repeated id from its cache instead of running it twice. A device that stays silent
raises ``DeviceTimeout`` at the deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgekit.device.errors import DeviceConnectionError, DeviceError, DeviceTimeout, NoisyLinkError
from edgekit.device.protocol import (
    KIND_ACK,
    KIND_NAK,
    KIND_POLL,
    KIND_REQUEST,
    KIND_RESPONSE,
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

UPLOAD_CHUNK = 256 << 10
MIN_CHUNK = 512


class Channel:
    """A byte stream to the agent. ``read`` returns b"" on timeout, raises ``ChannelClosed`` at the end."""

    def read(self, n: int, timeout: float) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Session:
    """An open conversation with one device agent."""

    def __init__(
        self,
        channel: Channel,
        url: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 30,
        chunk_size: int = UPLOAD_CHUNK,
        line_rate: float = 50_000.0,
    ):
        self.channel = channel
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.reader = FrameReader(channel.read, gap_timeout=1.0)
        self._next_id = random.randrange(1, 1 << 31)
        self.retransmissions = 0
        self.chunk_size = chunk_size
        self.line_rate = line_rate  # bytes/s assumed when waiting for a frame's ACK (a slow serial line: lower)
        self.ack_timeout = 1.0  # silence after a request's transfer time before it is resent
        self.poll_interval = 1.0  # first silence after the ACK before a poll (then doubling, up to 15 s)
        self.info: dict[str, Any] = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(
        self,
        op: str,
        blobs: list[bytes] | None = None,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        **fields: Any,
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request and wait for its response, recovering from damaged and lost frames.

        Until the agent acknowledges the request, silence for ``ack_timeout`` (plus the frame's
        transfer time at ``line_rate``) means the request or its ACK vanished: resend it (the agent
        answers a repeated id from its cache, never runs it twice). After the ACK the agent may be
        busy for long (a load, a profile): silence then sends a small POLL, at growing intervals,
        which the agent answers with the cached response once it has one. A damaged frame or a
        NAK triggers an immediate resend (a poll once acknowledged). ``max_retries`` bounds the
        resends caused by damage or loss, ``timeout`` the whole call."""
        timeout = self.timeout if timeout is None else timeout
        limit = self.max_retries if max_retries is None else max_retries
        rid = self._next_id
        self._next_id = (self._next_id + 1) & 0x7FFFFFFF or 1
        frame = encode_frame(KIND_REQUEST, rid, encode_message({"op": op, **fields}, blobs))
        poll = encode_frame(KIND_POLL, rid, b"")
        start = time.monotonic()
        deadline = start + timeout
        rto = self.ack_timeout + len(frame) / self.line_rate  # silence before the ACK: resend
        poll_every = self.poll_interval  # silence after the ACK: poll, backing off
        retries = 0
        acked = False
        resend_due = False  # one damaged frame can look like several: resend once for a burst
        self._write(frame)
        sent = start

        def retry(what: bytes) -> None:
            nonlocal retries, sent
            retries += 1
            self.retransmissions += 1
            if retries > limit:
                raise NoisyLinkError(
                    f"{self.url}: {retries} damaged or lost frames during {op!r}; the link is too noisy "
                    f"(check the cable and baud rate)"
                )
            self._write(what)
            sent = time.monotonic()

        while True:
            now = time.monotonic()
            if now >= deadline:
                raise DeviceTimeout(
                    f"{self.url}: no answer to {op!r} within {timeout:g} s; check the device is up and its agent "
                    f"running, or raise --timeout"
                )
            if resend_due and now - sent >= 0.05:
                resend_due = False
                retry(poll if acked else frame)
            elif not resend_due and not acked and now - sent >= rto:
                rto = min(2 * rto, 30.0)
                retry(frame)
            elif not resend_due and acked and now - sent >= poll_every:
                poll_every = min(2 * poll_every, 15.0)
                self._write(poll)  # the agent may just be busy: not counted as a retry
                sent = time.monotonic()
            now = time.monotonic()
            due = sent + (0.05 if resend_due else poll_every if acked else rto)
            wait = max(0.01, min(deadline, due) - now)
            try:
                kind, got, payload = self.reader.read_frame(wait)
            except FrameTimeout:
                continue
            except ChannelClosed as exc:
                raise DeviceConnectionError(
                    f"{self.url}: the link to the agent closed during {op!r} ({exc}); the agent died or the link "
                    f"dropped: retry"
                ) from exc
            except ProtocolError:
                resend_due = True
                continue
            if kind == KIND_NAK:
                if got == rid:  # the agent never got this request (a poll found nothing): send it again
                    acked = False
                    resend_due = True
                elif got == 0:
                    resend_due = True
                continue
            if got != rid:
                continue  # a late or repeated answer to an earlier request
            if kind == KIND_ACK:
                acked, resend_due = True, False
                continue
            if kind != KIND_RESPONSE:
                continue
            resp, out = decode_message(payload)
            if not resp.pop("ok", False):
                raise DeviceError(f"{self.url}: {op} failed on the device: {resp.get('error')}")
            return resp, out

    def _write(self, frame: bytes) -> None:
        try:
            self.channel.write(frame)
        except (OSError, ChannelClosed) as exc:
            raise DeviceConnectionError(f"{self.url}: cannot write to the device link ({exc}); retry") from exc

    # ---- operations -------------------------------------------------------------------
    def hello(self, *, attempts: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        """Greet the agent; a serial line may need a few tries (opening it drops early bytes)."""
        last: Exception | None = None
        for _ in range(attempts):
            try:
                self.info, _ = self.call("hello", timeout=timeout)
                return self.info
            except DeviceTimeout as exc:
                last = exc
        assert last is not None
        raise last

    def probe(self) -> dict[str, Any]:
        return self.call("probe")[0]

    def has(self, sha256: str) -> bool:
        return bool(self.call("has", sha256=sha256)[0]["present"])

    def activate(self, sha256: str) -> None:
        """Make a cached artifact the device's ``current`` one."""
        self.call("activate", sha256=sha256)

    def upload(self, data: bytes, sha256: str, progress: Callable[[int, int], None] | None = None) -> None:
        """Chunked upload then commit; the agent verifies the checksum before anything is used."""
        token = self.call("put_begin", sha256=sha256, size=len(data))[0]["token"]
        off = 0
        while off < len(data):
            chunk = data[off : off + self.chunk_size]
            try:
                self.call("put_chunk", [chunk], token=token, offset=off, max_retries=4)
            except NoisyLinkError:
                if self.chunk_size <= MIN_CHUNK:
                    raise
                self.chunk_size //= 2  # a noisy line: smaller frames get through intact more often
                continue
            off += len(chunk)
            if progress:
                progress(off, len(data))
        self.call("put_commit", token=token, timeout=max(self.timeout, 120.0))

    def load(self, sha256: str, threads: int = 0) -> dict[str, Any]:
        return self.call("load", sha256=sha256, threads=threads, timeout=max(self.timeout, 300.0))[0]

    def run(self, inputs: dict[str, np.ndarray], timeout: float | None = None) -> tuple[dict[str, np.ndarray], float]:
        blobs: list[bytes] = []
        resp, out = self.call("run", blobs, inputs=pack_arrays(inputs, blobs), timeout=timeout)
        return unpack_arrays(resp["outputs"], out), resp["time_ms"]

    def profile(
        self, inputs: dict[str, np.ndarray], runs: int, warmup: int, timeout: float | None = None
    ) -> dict[str, Any]:
        blobs: list[bytes] = []
        desc = pack_arrays(inputs, blobs)
        return self.call("profile", blobs, inputs=desc, runs=runs, warmup=warmup, timeout=timeout)[0]

    def intermediates(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs: list[bytes] = []
        resp, out = self.call("intermediates", blobs, inputs=pack_arrays(inputs, blobs))
        return unpack_arrays(resp["tensors"], out)
