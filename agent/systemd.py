"""sd_notify(3) without libsystemd: readiness, status, stopping, and a progress-gated watchdog.

systemd passes `NOTIFY_SOCKET` (a path, or an abstract socket name starting with '@') to a
`Type=notify` service; each notification is one datagram of `KEY=VALUE` lines. With
`WatchdogSec=` it also passes `WATCHDOG_USEC` (and `WATCHDOG_PID`, the process meant to
answer), and kills the service when no `WATCHDOG=1` arrives within that time. Without a
socket every call is a silent no-op, so the agent runs the same from a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

Clock = Callable[[], float]
# A notification must never stall the inference loop for long, even if systemd is busy.
SEND_TIMEOUT_S = 1.0


def _socket_address(value: str) -> str | None:
    """The address to send to, or None for a value this module cannot use."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    # systemd 254+ may hand out vsock: addresses (VMs); a device agent never sees one.
    log.warning("NOTIFY_SOCKET=%r is not a path or abstract socket: notifications off", value)
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (sd_watchdog_enabled(3) rules)."""
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: watchdog off", raw)
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            owner_pid = int(owner)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a number: watchdog off", owner)
            return None
        if owner_pid != pid:
            # Inherited from a parent that is the real watchdog client: not ours to feed.
            return None
    return usec


class Notifier:
    """Sends sd_notify messages over AF_UNIX datagrams; every method is a no-op without a socket.

    Send errors are logged once and reported as False, never raised: losing systemd must not
    stop inference.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, pid: int | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (pid: ours, for testing)."""
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    @property
    def watchdog_usec(self) -> int | None:
        """The watchdog timeout systemd enforces on us, or None when there is none."""
        return self._watchdog_usec

    def notify(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments as one datagram; True when systemd got it."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                if not self._warned:
                    log.warning("sd_notify to %r failed: %s", self._address, exc)
                    self._warned = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up finished (model loaded, first frame processed)."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status(status))

    def status(self, text: str) -> bool:
        """STATUS=: one line shown by `systemctl status`."""
        return self.notify(_status(text))

    def stopping(self) -> bool:
        """STOPPING=1: a clean shutdown has begun."""
        return self.notify("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: ask for more start (or stop) time, from now on."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1e6))}")

    def watchdog(self) -> bool:
        """WATCHDOG=1, only when systemd watches this process."""
        if self._watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; a later notification opens a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return "STATUS=" + " ".join(text.splitlines())


class WatchdogFeeder:
    """Feeds the watchdog every half interval, but only if the loop made progress since.

    The inference loop calls `progress()` after each frame (or each iteration that did its
    job, such as waiting out a camera reconnect); either a background thread (`start()`) or
    the loop itself (`maybe_feed()`) sends WATCHDOG=1. A loop that hangs stops calling
    `progress()`, pings stop, and systemd kills and restarts the service.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        usec = notifier.watchdog_usec
        if interval_s is None and usec is not None:
            interval_s = usec / 2e6  # sd_watchdog_enabled(3): ping at half the timeout
        self._notifier = notifier
        self.interval_s = interval_s
        self._clock = clock
        self._progress = 0
        self._fed_progress = 0
        self._last_ping = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when systemd expects watchdog pings from us."""
        return self.interval_s is not None and self._notifier.watchdog_usec is not None

    def progress(self) -> None:
        """Mark that the loop did useful work (cheap; call it once per frame)."""
        self._progress += 1

    def maybe_feed(self) -> bool:
        """Send WATCHDOG=1 if half the timeout has passed and progress was made since the last."""
        if not self.enabled or self.interval_s is None:
            return False
        now = self._clock()
        seen = self._progress
        if seen == self._fed_progress or now - self._last_ping < self.interval_s:
            return False
        self._fed_progress = seen
        self._last_ping = now
        return self._notifier.watchdog()

    def start(self) -> None:
        """Feed from a daemon thread until stop(); nothing to do when there is no watchdog."""
        if not self.enabled or self.interval_s is None or self._thread is not None:
            return
        self._stop.clear()
        # Check often: a ping goes out at most one tick after progress resumes.
        tick = self.interval_s / 10
        self._thread = threading.Thread(
            target=self._run, args=(tick,), name="sd-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self, tick: float) -> None:
        while not self._stop.wait(tick):
            self.maybe_feed()

    def stop(self) -> None:
        """Stop the feeding thread (the service is shutting down)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> WatchdogFeeder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
