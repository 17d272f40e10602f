"""Free loopback ports and waiting for a TCP listener to open or close."""

from __future__ import annotations

import random
import socket
import time

_LISTEN_PORTS = (10000, 32767)  # below Linux's default ephemeral range (32768-60999)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _LISTEN_PORTS[1] + 1


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on right now, outside the ephemeral range.

    A port the kernel hands out for bind(0) comes from the ephemeral range, where every
    outgoing connection of every process (an agent connecting to its broker) also takes its
    local port: between this call and the server's own bind, one of them could take it
    ("Address already in use", seen in CI with many agents running). Ports below that range
    are never given to outgoing connections, so only another listener can race for them.
    """
    low, high = _LISTEN_PORTS[0], min(_LISTEN_PORTS[1], _ephemeral_low() - 1)
    rng = random.Random()
    for _ in range(200 if high > low else 0):
        port = rng.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll until a TCP connect to host:port succeeds or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def wait_closed(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll until host:port refuses connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            return True
        time.sleep(0.02)
    return False
