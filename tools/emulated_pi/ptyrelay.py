"""A serial line made of two pseudo-terminals: bytes written to one end come out of the other.

Unlike a bare socat pty pair it survives either end being closed and reopened (pyserial does
that on every open): the relay keeps its own handle on both slave ends so the masters never
see EIO. Usage: ``python3 ptyrelay.py LINK_HOST LINK_DEVICE`` (creates the two symlinks).
"""

from __future__ import annotations

import os
import select
import sys
import tty


def open_end(link: str) -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    name = os.ttyname(slave)
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, link)
    return master, slave


def main() -> None:
    host_link, device_link = sys.argv[1], sys.argv[2]
    a, _keep_a = open_end(host_link)
    b, _keep_b = open_end(device_link)
    peer = {a: b, b: a}
    while True:
        ready, _, _ = select.select([a, b], [], [])
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                continue
            view = memoryview(data)
            while view:
                view = view[os.write(peer[fd], view) :]


if __name__ == "__main__":
    main()
