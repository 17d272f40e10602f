"""free_port: a listening port no outgoing connection can take before the server binds it."""

from __future__ import annotations

import socket

from edgefleet.server.netutil import free_port


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        return int(fh.read().split()[0])


def test_free_ports_are_bindable_and_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40  # random, not one port handed out again and again
    assert all(10000 <= p < _ephemeral_low() for p in ports), sorted(ports)
    for port in list(ports)[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))

