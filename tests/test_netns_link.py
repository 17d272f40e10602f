"""The slow-link harness shapes what it says: packets are lost, the rate is capped.

Both checks are bounds a faster machine cannot break (a 1 Mbit/s link cannot carry 256 KB in
under two seconds), not timings of this machine.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.harness.netns import NetnsUnavailable, slow_link

SEND_UDP = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(i.to_bytes(4, "big"), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.002)  # ~250 kbit/s with headers: under the rate, so only the loss drops
"""

SEND_TCP = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b"x" * int(sys.argv[3]))
s.close()
"""


def test_the_slow_link_loses_packets_and_caps_the_rate() -> None:
    try:
        with slow_link(rate="1mbit", delay="100ms", loss="10%") as link:
            print(f"\nlink: {link.shaping}")
            # Loss: 2000 small datagrams from the namespace, paced, counted on the root side.
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # Room for every datagram: a reader slowed by a busy machine must lose none.
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            rx.bind((link.host_ip, 0))
            sent = 2000
            # Read while it sends: a socket's buffer holds only a few hundred datagrams.
            port = str(rx.getsockname()[1])
            sender = subprocess.Popen(
                [*link.exec_prefix, sys.executable, "-c", SEND_UDP, link.host_ip, port, str(sent)]
            )
            got = set()
            try:
                while len(got) < sent:
                    # The sender's start may take a while on a busy machine; then 3 s of
                    # silence means it is done.
                    rx.settimeout(3.0 if got else 60.0)
                    got.add(int.from_bytes(rx.recv(16), "big"))
            except TimeoutError:
                pass
            assert sender.wait(60) == 0
            rx.close()
            lost = 1 - len(got) / sent
            print(f"lost {lost:.1%} of {sent} datagrams")
            # 10% asked; 2000 draws put the share within 7%..13% but for one run in 10^5.
            assert 0.07 <= lost <= 0.13, lost

            # Rate: 256 KB over TCP, with the losses retransmitted, at 1 Mbit/s.
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((link.host_ip, 0))
            srv.listen(1)
            size = 256 * 1024
            t0 = time.monotonic()
            port = str(srv.getsockname()[1])
            tcp = subprocess.Popen(
                [*link.exec_prefix, sys.executable, "-c", SEND_TCP, link.host_ip, port, str(size)]
            )
            conn, _ = srv.accept()
            received = 0
            conn.settimeout(60)
            while chunk := conn.recv(65536):
                received += len(chunk)
            elapsed = time.monotonic() - t0
            assert tcp.wait(60) == 0
            conn.close()
            srv.close()
            assert received == size
            print(f"256 KB in {elapsed:.1f} s")
            # The rate is tbf's, whose 32 KB bucket leaves at once, with netem in front as
            # without (a run with netem measured 2.04 s, under the 2.10 s of no bucket): the
            # rest needs (256 - 32) KB at 1 Mbit/s, 1.8 s. Uncapped it would take milliseconds.
            burst = 32 * 1024
            assert elapsed >= (size - burst) * 8 / 1e6, elapsed
    except NetnsUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
