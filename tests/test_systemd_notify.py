"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.systemd import Notifier, WatchdogFeeder
from tests.harness.notify import FakeSystemd

WATCHDOG_USEC = 200_000  # systemd would kill us 0.2 s after the last ping
INTERVAL_S = WATCHDOG_USEC / 1e6


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(tmp_path / "notify")
    assert len(path) < 108, "sun_path limit"
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


def _env(path: str, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": path, **extra}


def test_ready_status_stopping_reach_the_socket(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    notifier = Notifier.from_env(_env(path))
    assert notifier.enabled
    assert notifier.ready("model loaded, camera delivering")
    assert fake.recv() == "READY=1\nSTATUS=model loaded, camera delivering"
    assert notifier.ready()
    assert fake.recv() == "READY=1"
    assert notifier.status("12.5 fps\nexit 0: 81%")  # a newline must not start a new key
    assert fake.recv() == "STATUS=12.5 fps exit 0: 81%"
    assert notifier.extend_timeout(30)
    assert fake.recv() == "EXTEND_TIMEOUT_USEC=30000000"
    assert notifier.stopping()
    assert fake.recv() == "STOPPING=1"
    # No WATCHDOG_USEC: systemd does not watch us, so nothing is sent.
    assert notifier.watchdog_usec is None
    assert not notifier.watchdog()
    assert fake.collect(0.1) == []
    notifier.close()


def test_abstract_socket() -> None:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    try:
        notifier = Notifier.from_env(_env(fake.env_value))
        assert notifier.ready("up")
        assert fake.recv() == "READY=1\nSTATUS=up"
        assert notifier.stopping()
        assert fake.recv() == "STOPPING=1"
        notifier.close()
    finally:
        fake.close()


def test_watchdog_fed_while_progress_and_not_once_the_loop_stalls(
    systemd: tuple[FakeSystemd, str],
) -> None:
    fake, path = systemd
    notifier = Notifier.from_env(
        _env(path, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID=str(os.getpid()))
    )
    assert notifier.watchdog_usec == WATCHDOG_USEC
    feeder = WatchdogFeeder(notifier)
    assert feeder.interval_s == pytest.approx(INTERVAL_S / 2)

    stalled = threading.Event()
    quit_loop = threading.Event()

    def inference_loop() -> None:
        while not quit_loop.is_set():
            if not stalled.is_set():
                feeder.progress()
            time.sleep(0.005)  # one "frame" of simulated work

    loop = threading.Thread(target=inference_loop)
    with feeder:
        loop.start()
        try:
            assert fake.receive(3) == ["WATCHDOG=1"] * 3  # fed while frames flow

            stalled.set()  # the loop hangs: it keeps running but never finishes a frame
            # Ten ping intervals pass on purpose: a feeder that ignored progress would ping
            # about ten times; this one at most once, for progress made just before the stall.
            hung = fake.collect(5 * INTERVAL_S)  # ten ping intervals
            assert len(hung) <= 1, f"fed the watchdog without progress: {hung}"

            stalled.clear()  # the loop recovers: feeding resumes
            assert fake.receive(2) == ["WATCHDOG=1"] * 2
        finally:
            quit_loop.set()
            loop.join()
    assert feeder._thread is None


def test_maybe_feed_from_the_loop_itself(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    now = [100.0]
    notifier = Notifier.from_env(_env(path, WATCHDOG_USEC="30000000"))  # no WATCHDOG_PID: ours
    feeder = WatchdogFeeder(notifier, clock=lambda: now[0])
    assert feeder.interval_s == 15.0

    feeder.progress()
    now[0] += 14.9
    assert not feeder.maybe_feed()  # progress, but too early
    now[0] += 0.2
    assert feeder.maybe_feed()
    assert fake.recv() == "WATCHDOG=1"
    now[0] += 20
    assert not feeder.maybe_feed()  # due, but no frame since the last ping
    feeder.progress()
    assert feeder.maybe_feed()  # the first frame after a pause pings at once
    assert fake.recv() == "WATCHDOG=1"
    assert fake.collect(0.05) == []


def test_watchdog_pid_of_another_process_is_not_ours(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    notifier = Notifier.from_env(
        _env(path, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID=str(os.getpid() + 1))
    )
    assert notifier.watchdog_usec is None
    assert not notifier.watchdog()
    feeder = WatchdogFeeder(notifier)
    assert not feeder.enabled
    with feeder:
        assert feeder._thread is None
        for _ in range(40):  # frames for well over a ping interval: still nothing to send
            feeder.progress()
            feeder.maybe_feed()
            time.sleep(0.01)
    assert fake.collect(0.2) == []
    # The socket itself is still ours: readiness goes through.
    assert notifier.ready()
    assert fake.recv() == "READY=1"


@pytest.mark.parametrize("bad", ["", "0", "-5", "soon"])
def test_unusable_watchdog_usec_means_no_watchdog(bad: str, tmp_path: Path) -> None:
    notifier = Notifier.from_env(_env(str(tmp_path / "notify"), WATCHDOG_USEC=bad))
    assert notifier.watchdog_usec is None


def test_no_notify_socket_is_a_silent_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert not notifier.enabled
    assert notifier.watchdog_usec is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert not notifier.watchdog()
    feeder = WatchdogFeeder(notifier)
    assert not feeder.enabled
    with feeder:
        feeder.progress()
        assert not feeder.maybe_feed()
        assert feeder._thread is None
    notifier.close()


def test_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    # systemd went away (or the path is stale): the agent keeps running.
    notifier = Notifier.from_env(_env(str(tmp_path / "gone")))
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.stopping()
    notifier.close()
