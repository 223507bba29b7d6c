"""The agent wire protocol: framing, CRC detection of every damaged frame, resynchronisation,
and a whole session with the real agent over a line that flips bits and drops bytes."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from edgekit.device.protocol import (
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
from edgekit.device.session import Channel, Session


def reader_over(data: bytes, gap: float = 0.05) -> FrameReader:
    buf = bytearray(data)

    def read(n: int, timeout: float) -> bytes:
        if not buf:
            time.sleep(min(timeout, 0.01))
            return b""
        chunk = bytes(buf[:n])
        del buf[:n]
        return chunk

    return FrameReader(read, gap_timeout=gap)


def test_frame_and_message_round_trip():
    arrays = {"a": np.arange(12, dtype=np.int8).reshape(3, 4), "b": np.linspace(0, 1, 5, dtype=np.float32)}
    blobs: list[bytes] = []
    desc = pack_arrays(arrays, blobs)
    frame = encode_frame(KIND_REQUEST, 77, encode_message({"op": "run", "inputs": desc}, blobs))
    kind, rid, payload = reader_over(b"garbage-before" + frame).read_frame(1.0)
    assert (kind, rid) == (KIND_REQUEST, 77)
    msg, got = decode_message(payload)
    back = unpack_arrays(msg["inputs"], got)
    assert msg["op"] == "run"
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype


def test_every_single_bit_flip_is_detected():
    frame = encode_frame(KIND_RESPONSE, 5, encode_message({"ok": True, "x": 1}, [bytes(range(40))]))
    for bit in range(len(frame) * 8):
        damaged = bytearray(frame)
        damaged[bit // 8] ^= 1 << (bit % 8)
        reader = reader_over(bytes(damaged))
        with pytest.raises((ProtocolError, FrameTimeout)):
            reader.read_frame(0.2)


def test_random_multi_byte_damage_never_yields_a_wrong_frame():
    rng = random.Random(1)
    payload = encode_message({"ok": True}, [bytes(rng.randrange(256) for _ in range(300))])
    frame = encode_frame(KIND_RESPONSE, 9, payload)
    for _ in range(300):
        damaged = bytearray(frame)
        for _ in range(rng.randrange(1, 6)):
            damaged[rng.randrange(len(damaged))] ^= rng.randrange(1, 256)
        if bytes(damaged) == frame:
            continue
        with pytest.raises((ProtocolError, FrameTimeout)):
            reader_over(bytes(damaged)).read_frame(0.2)


def test_reader_resyncs_after_a_damaged_frame():
    good = encode_frame(KIND_RESPONSE, 2, b"second")
    bad = bytearray(encode_frame(KIND_RESPONSE, 1, b"first"))
    bad[20] ^= 0x10
    reader = reader_over(bytes(bad) + good)
    seen = []
    for _ in range(5):
        try:
            seen.append(reader.read_frame(0.5))
            break
        except ProtocolError:
            continue
    assert seen == [(KIND_RESPONSE, 2, b"second")]


def test_truncated_frame_is_reported_not_awaited_forever():
    frame = encode_frame(KIND_RESPONSE, 3, b"x" * 100)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="cut short"):
        reader_over(frame[:60], gap=0.2).read_frame(5.0)
    assert time.monotonic() - t0 < 2.0


class SilentChannel(Channel):
    """A device that never answers."""

    def read(self, n: int, timeout: float) -> bytes:
        time.sleep(min(timeout, 0.05))
        return b""

    def write(self, data: bytes) -> None:
        pass


class ClosedChannel(Channel):
    def read(self, n: int, timeout: float) -> bytes:
        raise ChannelClosed("gone")

    def write(self, data: bytes) -> None:
        pass


def test_silent_device_times_out_with_a_clear_error():
    from edgekit.device.errors import DeviceTimeout

    s = Session(SilentChannel(), "test://silent", timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="no answer to 'hello' within"):
        s.hello(timeout=0.5)
    assert time.monotonic() - t0 < 2.0


def test_closed_link_is_a_connection_error():
    from edgekit.device.errors import DeviceConnectionError

    with pytest.raises(DeviceConnectionError, match="agent died or the link dropped"):
        Session(ClosedChannel(), "test://closed", timeout=1.0).probe()


def test_noisy_line_to_the_real_agent_never_gives_a_wrong_answer(tmp_path, resnet8_int8):
    """Bit flips and dropped bytes in both directions: every bad frame is resent; results stay exact."""
    from edgekit.device.artifacts import pack_reference_artifact
    from edgekit.device.deploy import deploy
    from edgekit.device.transports import open_session
    from tests.device_helpers import DATA, NoisyChannel

    art = pack_reference_artifact(resnet8_int8, tmp_path / "r8.tar")
    x = np.load(DATA / "cifar10_test.npz")["x"][:2].astype(np.float32)
    want = resnet8_int8.run(x, integer=True)["Identity"]
    clean = open_session(f"local://?root={tmp_path / 'dev'}", timeout=30)
    noisy = NoisyChannel(clean.channel, flip=3e-5, drop=1e-5, seed=3)
    s = Session(noisy, "local://noisy", timeout=60, max_retries=200)
    s.reader.gap_timeout = 0.3
    sha = deploy(s, art).sha256  # ~250 KB upload through the noise
    s.load(sha)
    for _ in range(15):
        out, _ = s.run({"input_1": x})
        np.testing.assert_array_equal(out["Identity"], want)
    assert noisy.flipped + noisy.dropped > 0
    assert s.retransmissions > 0
    s.close()


def test_upload_over_a_very_noisy_line_shrinks_frames_and_lands_intact(tmp_path):
    """At 1e-4 errors per byte a 256 KiB frame (~26 expected flips) practically never arrives intact:
    the upload shrinks its frames. Some frames lose their magic and vanish without a NAK (this once
    left a put_chunk unanswered for 60 s): silence is resent or polled for, so no call waits out its
    timeout (20 s here)."""
    from edgekit.artifact import pack_artifact, sha256_file
    from edgekit.device.deploy import deploy
    from edgekit.device.transports import open_session
    from tests.device_helpers import NoisyChannel

    blob = tmp_path / "weights.bin"
    blob.write_bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    art = pack_artifact(
        tmp_path / "big.tar", {"runtime": "onnxruntime", "model_file": "weights.bin"}, {"weights.bin": blob}
    )
    clean = open_session(f"local://?root={tmp_path / 'dev'}", timeout=30)
    noisy = NoisyChannel(clean.channel, flip=1e-4, drop=5e-6, seed=7)
    s = Session(noisy, "local://noisy", timeout=20, max_retries=200)
    s.reader.gap_timeout = 0.3
    t0 = time.monotonic()
    res = deploy(s, art)
    assert res.uploaded and s.chunk_size < 256 << 10 and time.monotonic() - t0 < 90
    stored = tmp_path / "dev" / "cache" / res.sha256 / "files" / "weights.bin"
    assert sha256_file(stored) == sha256_file(blob)
    s.close()


@pytest.mark.parametrize("fault", ["magic", "header", "payload", "drop", "cut"])
@pytest.mark.parametrize("nth", [1, 2])
@pytest.mark.parametrize("direction", ["out", "back"])
def test_one_lost_or_damaged_frame_is_recovered_not_waited_out(tmp_path, direction, nth, fault):
    """Exactly the nth frame host->agent or agent->host is damaged or lost (including the frames
    nothing can NAK: a hit magic, a dropped frame). The call must be retried to completion well
    within the session timeout, and a request the agent already ran must be answered from its
    recent-responses cache, not run again (a second put_begin would leave a second upload file)."""
    import hashlib
    import os

    from edgekit.device.transports import open_session
    from tests.device_helpers import FrameFaults

    root = tmp_path / "dev"
    s = open_session(f"local://?root={root}", timeout=20)
    ch = FrameFaults(s.channel, **{direction: {nth: fault}})
    s.channel, s.reader = ch, FrameReader(ch.read, gap_timeout=0.3)
    data = os.urandom(3000)
    try:
        t0 = time.monotonic()
        token = s.call("put_begin", sha256=hashlib.sha256(data).hexdigest(), size=len(data))[0]["token"]
        assert s.call("put_chunk", [data], token=token, offset=0)[0]["received"] == len(data)
        took = time.monotonic() - t0
        assert s.probe()["arch"]  # and the session goes on normally
    finally:
        s.close()
    assert ch.damaged == [(direction, nth, fault)]
    assert took < 8, f"recovering from one {fault} frame took {took:.1f} s"
    incoming = list((root / "cache").glob(".incoming-*"))
    assert len(incoming) == 1 and incoming[0].read_bytes() == data
