"""The agent wire protocol: versioned frames with a request id and CRCs, over any byte stream.

A frame is a 16-byte header, the payload, and the payload's CRC-32::

    magic b"EK" | version u8 | kind u8 | request id u32 | payload length u32 | header CRC-32 u32
    payload (length bytes) | payload CRC-32 u32

The header has its own CRC so a corrupted length is caught before waiting for bytes that will
never come; the reader then resynchronises on the next magic. ``kind`` is

- REQUEST (host -> agent) and RESPONSE (agent -> host, same id);
- ACK (agent -> host, the request's id, empty): the request arrived intact and is being run;
- POLL (host -> agent, a request's id, empty): "send the response to this id again"; the agent
  answers from its recent-responses cache, or with a NAK carrying that id if it never got it;
- NAK (either way): id 0 means "a damaged frame arrived", an id means "unknown request: resend it".

A frame whose magic is hit vanishes without a trace (nothing can NAK it), so the host never relies
on a NAK alone: silence before the ACK means "resend the request", silence after it "poll". A
payload is a message: a JSON object plus binary blobs (arrays travel as blobs, described in the
JSON). Standard library only, numpy imported lazily: the device agent imports this module.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"EK"
KIND_REQUEST = 1
KIND_RESPONSE = 2
KIND_NAK = 3
KIND_ACK = 4
KIND_POLL = 5
_HEADER = struct.Struct(">2sBBII")  # magic, version, kind, request id, payload length
HEADER_SIZE = _HEADER.size + 4
MAX_PAYLOAD = 256 << 20


class ProtocolError(Exception):
    """A frame is damaged, of another protocol version, or the stream ended."""


class FrameTimeout(ProtocolError):
    """No complete frame arrived in time."""


class ChannelClosed(ProtocolError):
    """The other end closed the byte stream."""


def encode_frame(kind: int, request_id: int, payload: bytes) -> bytes:
    """One frame, ready to write."""
    head = _HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, request_id & 0xFFFFFFFF, len(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + payload + struct.pack(">I", zlib.crc32(payload))


class FrameReader:
    """Pulls frames out of a byte stream given by ``read(max_bytes, timeout) -> bytes``.

    ``read`` returns ``b""`` on timeout and raises ``ChannelClosed`` at end of stream.
    A damaged frame raises ``ProtocolError`` after the reader has skipped past it.
    """

    def __init__(self, read: Callable[[int, float], bytes], gap_timeout: float = 1.0):
        self._read = read
        self._buf = bytearray()
        self.gap_timeout = gap_timeout  # longest silence allowed inside one frame

    def _fill(self, need: int, deadline: float, in_frame: bool) -> None:
        last = time.monotonic()
        while len(self._buf) < need:
            now = time.monotonic()
            # inside a frame only silence counts: a frame that keeps arriving may finish past the deadline
            limit = last + self.gap_timeout if in_frame else deadline
            if limit and now >= limit:
                if in_frame:
                    raise ProtocolError("frame cut short (bytes stopped arriving mid-frame)")
                raise FrameTimeout("no frame arrived in time")
            chunk = self._read(max(need - len(self._buf), 65536), min(0.2, max(limit - now, 0.001)) if limit else 0.2)
            if chunk:
                self._buf += chunk
                last = time.monotonic()

    def read_frame(self, timeout: float | None) -> tuple[int, int, bytes]:
        """The next intact frame as (kind, request id, payload)."""
        deadline = time.monotonic() + timeout if timeout else 0.0
        while True:
            self._fill(2, deadline, False)
            start = self._buf.find(MAGIC)
            if start < 0:
                del self._buf[: len(self._buf) - 1]  # keep a possible first magic byte
                self._fill(len(self._buf) + 1, deadline, False)
                continue
            if start:
                del self._buf[:start]
            try:
                self._fill(HEADER_SIZE, deadline, True)
            except ProtocolError:
                self._buf.clear()
                raise
            head = bytes(self._buf[: _HEADER.size])
            (crc,) = struct.unpack(">I", self._buf[_HEADER.size : HEADER_SIZE])
            if zlib.crc32(head) != crc:
                del self._buf[:1]  # not a real frame start (or a damaged one): resync
                raise ProtocolError("damaged frame header")
            _, version, kind, rid, length = _HEADER.unpack(head)
            if version != PROTOCOL_VERSION:
                del self._buf[:HEADER_SIZE]
                raise ProtocolError(f"peer speaks protocol version {version}, this side {PROTOCOL_VERSION}")
            if length > MAX_PAYLOAD:
                del self._buf[:1]
                raise ProtocolError(f"frame of {length} bytes exceeds the limit")
            total = HEADER_SIZE + length + 4
            try:
                self._fill(total, deadline, True)
            except ProtocolError:
                self._buf.clear()
                raise
            payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
            (pcrc,) = struct.unpack(">I", self._buf[HEADER_SIZE + length : total])
            if zlib.crc32(payload) != pcrc:
                del self._buf[:1]
                raise ProtocolError(f"damaged payload in frame {rid}")
            del self._buf[:total]
            return kind, rid, payload


# ---- messages: JSON + blobs ------------------------------------------------------------------


def encode_message(obj: dict[str, Any], blobs: list[bytes] | None = None) -> bytes:
    """A payload: u32 JSON length, JSON (with ``_blobs`` lengths), then the blobs back to back."""
    blobs = blobs or []
    body = dict(obj)
    body["_blobs"] = [len(b) for b in blobs]
    js = json.dumps(body, separators=(",", ":")).encode()
    return struct.pack(">I", len(js)) + js + b"".join(blobs)


def decode_message(payload: bytes) -> tuple[dict[str, Any], list[bytes]]:
    (n,) = struct.unpack(">I", payload[:4])
    obj = json.loads(payload[4 : 4 + n])
    blobs, pos = [], 4 + n
    for length in obj.pop("_blobs", []):
        blobs.append(payload[pos : pos + length])
        pos += length
    if pos != len(payload):
        raise ProtocolError("message blobs do not add up to the payload length")
    return obj, blobs


def pack_arrays(arrays: dict[str, Any], blobs: list[bytes]) -> dict[str, dict[str, Any]]:
    """Describe numpy arrays in JSON and append their bytes to ``blobs``."""
    import numpy as np

    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[name] = {"dtype": str(a.dtype), "shape": list(a.shape), "blob": len(blobs)}
        blobs.append(a.tobytes())
    return out


def unpack_arrays(desc: dict[str, dict[str, Any]], blobs: list[bytes]) -> dict[str, Any]:
    import numpy as np

    return {
        name: np.frombuffer(blobs[d["blob"]], dtype=d["dtype"]).reshape(d["shape"]).copy() for name, d in desc.items()
    }
