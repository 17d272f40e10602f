"""The receiving end of NOTIFY_SOCKET: a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

Message = tuple[float, str]  # (monotonic arrival time, one datagram's text)


class FakeSystemd:
    """Binds `address` (a path, or "\\0name" in the abstract namespace) and reads datagrams."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        # What NOTIFY_SOCKET says: systemd writes an abstract name with a leading '@'.
        self.env_value = "@" + address[1:] if address.startswith("\0") else address

    def recv(self, timeout: float = 2.0) -> str:
        """The next datagram; TimeoutError when none comes within timeout."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def receive(self, count: int, timeout: float = 10.0) -> list[str]:
        """The next `count` datagrams, however long they take up to timeout (then fail)."""
        return [m for _, m in self.collect_until(lambda got: len(got) >= count, timeout)]

    def collect_until(self, done: Callable[[list[Message]], bool], timeout: float) -> list[Message]:
        """Datagrams with arrival times until done(all so far) holds; fails showing what came."""
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while not done(out):
            left = deadline - time.monotonic()
            assert left > 0, f"the expected notifications did not come in {timeout:g} s: {out}"
            try:
                text = self.recv(min(left, 0.5))
            except TimeoutError:
                continue
            out.append((time.monotonic(), text))
        return out

    def collect(self, seconds: float) -> list[str]:
        """Everything that arrives within the next `seconds` (to show that nothing does)."""
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.recv(left))
            except TimeoutError:
                break
        return out

    def drain(self) -> list[str]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        """Unbind (the path stays; tmp_path cleans it up)."""
        self.sock.close()
