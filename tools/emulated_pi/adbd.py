"""A small adbd for the emulated device: the ADB wire protocol over TCP, standard library only.

Enough for the real ``adb`` client's ``connect``, ``devices -l``, ``features``, ``shell`` (the
shell_v2 protocol with separate stderr and exit codes, and the legacy one), ``push``/``pull``
(``sync:``) and ``forward`` (``tcp:PORT``). No authentication:
it listens on loopback only. Usage: ``python3 adbd.py --port 5565``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import stat
import struct
import subprocess
import threading

A_SYNC, A_CNXN, A_OPEN, A_OKAY = 0x434E5953, 0x4E584E43, 0x4E45504F, 0x59414B4F
A_CLSE, A_WRTE, A_AUTH = 0x45534C43, 0x45545257, 0x48545541
VERSION = 0x01000001
MAX_DATA = 256 * 1024
BANNER = (
    b"device::ro.product.name=rpi4;ro.product.model=Emulated_Raspberry_Pi_4;ro.product.device=rpi4;"
    b"features=shell_v2,cmd\0"
)
HEADER = struct.Struct("<6I")


class Connection:
    """One TCP connection from the adb server: a set of multiplexed streams."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.send_lock = threading.Lock()
        self.streams: dict[int, Stream] = {}
        self.ids = itertools.count(1)

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        head = HEADER.pack(cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF)
        with self.send_lock:
            self.sock.sendall(head + data)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def serve(self) -> None:
        try:
            while True:
                cmd, arg0, arg1, length, _, _ = HEADER.unpack(self.recv_exact(HEADER.size))
                data = self.recv_exact(length) if length else b""
                self.dispatch(cmd, arg0, arg1, data)
        except (EOFError, OSError):
            pass
        finally:
            for s in list(self.streams.values()):
                s.closed_by_peer()
            self.sock.close()

    def dispatch(self, cmd: int, arg0: int, arg1: int, data: bytes) -> None:
        if cmd == A_CNXN:
            self.send(A_CNXN, VERSION, MAX_DATA, BANNER)
        elif cmd == A_OPEN:
            service = data.rstrip(b"\0").decode()
            local = next(self.ids)
            stream = Stream(self, local, arg0)
            name = service.split(":", 1)[0]
            handler = SERVICES.get(name + ":")
            if handler is None and name.startswith("shell,") and "v2" in name.split(","):
                handler = service_shell_v2  # "shell,v2[,raw|,pty][,TERM=..]:command"
            if handler is None:
                self.send(A_CLSE, 0, arg0)
                return
            self.streams[local] = stream
            self.send(A_OKAY, local, arg0)
            threading.Thread(target=stream.run, args=(handler, service.split(":", 1)[1]), daemon=True).start()
        elif cmd == A_WRTE:
            s = self.streams.get(arg1)
            if s is not None:
                s.deliver(data)
                self.send(A_OKAY, arg1, arg0)
        elif cmd == A_OKAY:
            s = self.streams.get(arg1)
            if s is not None:
                s.acked.set()
        elif cmd == A_CLSE:
            s = self.streams.pop(arg1, None)
            if s is not None:
                s.closed_by_peer()


class Stream:
    """One service stream: bytes in from the host, WRTE out with one message in flight."""

    def __init__(self, conn: Connection, local: int, remote: int):
        self.conn, self.local, self.remote = conn, local, remote
        self.acked = threading.Event()
        self.acked.set()
        self.cond = threading.Condition()
        self.inbox = bytearray()
        self.eof = False

    def deliver(self, data: bytes) -> None:
        with self.cond:
            self.inbox += data
            self.cond.notify_all()

    def closed_by_peer(self) -> None:
        with self.cond:
            self.eof = True
            self.cond.notify_all()
        self.acked.set()

    def read(self, n: int) -> bytes:
        """Up to n bytes (b"" at end of stream)."""
        with self.cond:
            while not self.inbox and not self.eof:
                self.cond.wait()
            data = bytes(self.inbox[:n])
            del self.inbox[:n]
            return data

    def read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.read(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def write(self, data: bytes) -> None:
        for off in range(0, len(data), MAX_DATA):
            self.acked.wait()
            if self.eof:
                raise EOFError
            self.acked.clear()
            self.conn.send(A_WRTE, self.local, self.remote, data[off : off + MAX_DATA])

    def run(self, handler, arg: str) -> None:
        try:
            handler(self, arg)
        except (EOFError, OSError):
            pass
        finally:
            # wait for the last write's OKAY while still registered (the client may answer it with CLSE)
            self.acked.wait(5)
            if self.conn.streams.pop(self.local, None) is not None:
                try:
                    self.conn.send(A_CLSE, self.local, self.remote)
                except OSError:
                    pass


def _spawn_shell(command: str, stderr: int) -> subprocess.Popen:
    """``sh -c COMMAND`` (an interactive ``sh -i`` for an empty one) in its own session, stdin/stdout piped."""
    return subprocess.Popen(
        ["/bin/sh", "-c", command] if command else ["/bin/sh", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )


def service_shell(stream: Stream, command: str) -> None:
    """Legacy shell: stdout and stderr merged onto the stream, host bytes to stdin, no exit code."""
    proc = _spawn_shell(command, stderr=subprocess.STDOUT)

    def pump_in() -> None:
        try:
            while True:
                data = stream.read(65536)
                if not data:
                    break
                proc.stdin.write(data)
                proc.stdin.flush()
        except OSError:
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    threading.Thread(target=pump_in, daemon=True).start()
    while True:
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        stream.write(data)
    proc.wait()


SHELL_STDIN, SHELL_STDOUT, SHELL_STDERR, SHELL_EXIT, SHELL_CLOSE_STDIN = 0, 1, 2, 3, 4
SHELL_PACKET = struct.Struct("<BI")


def service_shell_v2(stream: Stream, command: str) -> None:
    """The shell protocol (feature ``shell_v2``): stdin, stdout and stderr as separate packets
    ``[id u8][length u32][data]``, and the exit status as a last packet, so ``adb shell`` returns it."""
    proc = _spawn_shell(command, stderr=subprocess.PIPE)
    lock = threading.Lock()

    def send(ident: int, data: bytes) -> None:
        with lock:
            stream.write(SHELL_PACKET.pack(ident, len(data)) + data)

    def pump_in() -> None:
        try:
            while True:
                ident, length = SHELL_PACKET.unpack(stream.read_exact(SHELL_PACKET.size))
                data = stream.read_exact(length) if length else b""
                if ident == SHELL_STDIN:
                    proc.stdin.write(data)
                    proc.stdin.flush()
                elif ident == SHELL_CLOSE_STDIN:
                    break
        except (EOFError, OSError):
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def pump_out(fd: int, ident: int) -> None:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            send(ident, data)

    threading.Thread(target=pump_in, daemon=True).start()
    err = threading.Thread(target=pump_out, args=(proc.stderr.fileno(), SHELL_STDERR), daemon=True)
    err.start()
    pump_out(proc.stdout.fileno(), SHELL_STDOUT)
    err.join()
    send(SHELL_EXIT, bytes([proc.wait() & 0xFF]))


def service_tcp(stream: Stream, port: str) -> None:
    """``adb forward``'s device end: relay to 127.0.0.1:PORT."""
    sock = socket.create_connection(("127.0.0.1", int(port.split(":")[-1])))

    def pump_in() -> None:
        try:
            while True:
                data = stream.read(65536)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=pump_in, daemon=True).start()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            stream.write(data)
    finally:
        sock.close()


def _sync_reply(stream: Stream, ident: bytes, *words: int, data: bytes = b"") -> None:
    stream.write(ident + b"".join(struct.pack("<I", w) for w in words) + data)


def service_sync(stream: Stream, _: str) -> None:
    """The file-transfer protocol: STAT, LIST, SEND, RECV, QUIT."""
    while True:
        ident, length = struct.unpack("<4sI", stream.read_exact(8))
        if ident == b"QUIT":
            return
        path = stream.read_exact(length).decode()
        if ident == b"STAT":
            try:
                st = os.stat(path)
                _sync_reply(stream, b"STAT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime))
            except OSError:
                _sync_reply(stream, b"STAT", 0, 0, 0)
        elif ident == b"LIST":
            try:
                for name in sorted(os.listdir(path)):
                    st = os.lstat(os.path.join(path, name))
                    raw = name.encode()
                    _sync_reply(
                        stream, b"DENT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime), len(raw), data=raw
                    )
            except OSError:
                pass
            _sync_reply(stream, b"DONE", 0, 0, 0, 0)
        elif ident == b"SEND":
            target, _, mode = path.rpartition(",")
            error = None
            f = None
            try:
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                f = open(target, "wb")  # noqa: SIM115
            except OSError as exc:
                error = str(exc)
            while True:
                kind, n = struct.unpack("<4sI", stream.read_exact(8))
                if kind == b"DONE":
                    break
                chunk = stream.read_exact(n)
                if f is not None:
                    f.write(chunk)
            if f is not None:
                f.close()
                os.chmod(target, stat.S_IMODE(int(mode)) if mode.isdigit() else 0o644)
            if error:
                _sync_reply(stream, b"FAIL", len(error.encode()), data=error.encode())
            else:
                _sync_reply(stream, b"OKAY", 0)
        elif ident == b"RECV":
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(64 * 1024):
                        _sync_reply(stream, b"DATA", len(chunk), data=chunk)
                _sync_reply(stream, b"DONE", 0)
            except OSError as exc:
                msg = str(exc).encode()
                _sync_reply(stream, b"FAIL", len(msg), data=msg)
        else:
            msg = b"unsupported sync request"
            _sync_reply(stream, b"FAIL", len(msg), data=msg)


SERVICES = {"shell:": service_shell, "tcp:": service_tcp, "sync:": service_sync}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((args.host, args.port))
    srv.listen(8)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Connection(sock).serve, daemon=True).start()


if __name__ == "__main__":
    main()
