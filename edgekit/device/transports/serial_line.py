"""``serial:///dev/ttyUSB0?baud=921600``: the agent on the device end of a serial line (pyserial).

The agent must already run on the device (e.g. started at boot, as the emulated Pi does); a serial
line cannot install it. Opening a port with pyserial drops bytes that arrived before, so the hello
is retried until answered; every frame has a CRC and an id, so corrupted or lost bytes lead to a
resend, never to a wrong answer.
"""

from __future__ import annotations

from typing import Any

from edgekit.device.errors import DeviceConnectionError, DeviceTimeout
from edgekit.device.protocol import ChannelClosed
from edgekit.device.session import Channel, Session


class SerialChannel(Channel):
    def __init__(self, port: Any):
        self.port = port

    def read(self, n: int, timeout: float) -> bytes:
        import serial

        try:
            self.port.timeout = max(timeout, 0.001)
            first = self.port.read(1)
            if not first:
                return b""
            waiting = self.port.in_waiting
            return first + (self.port.read(min(waiting, n - 1)) if waiting and n > 1 else b"")
        except serial.SerialException as exc:
            raise ChannelClosed(str(exc)) from exc

    def write(self, data: bytes) -> None:
        import serial

        try:
            self.port.write(data)
            self.port.flush()
        except serial.SerialException as exc:
            raise ChannelClosed(str(exc)) from exc

    def close(self) -> None:
        self.port.close()


def open_serial_port(parts: Any, query: dict[str, str]) -> Any:
    import serial

    device = parts.path or parts.netloc
    try:
        return serial.Serial(device, baudrate=int(query.get("baud", 115200)), timeout=0.1, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        msg = f"serial://{device}: cannot open ({exc}); check the port name and permissions"
        raise DeviceConnectionError(msg) from exc


def open_serial(url: str, parts: Any, query: dict[str, str], timeout: float, wrap=None) -> Session:
    """``wrap`` (tests): a function that wraps the channel, e.g. to inject line noise."""
    channel: Channel = SerialChannel(open_serial_port(parts, query))
    if wrap is not None:
        channel = wrap(channel)
    session = Session(channel, url, timeout=timeout, chunk_size=16 << 10)
    try:
        session.hello(attempts=max(1, int(min(timeout, 30.0) / 2)), timeout=2.0)
    except DeviceTimeout as exc:
        session.close()
        raise DeviceTimeout(
            f"{url}: no agent answered on the serial line within {timeout:g} s; start it on the device with "
            f"`python3 edgekit_agent.py --serial /dev/ttyXXX` and check the baud rate"
        ) from exc
    return session
