"""The Simulator: N simulated devices driven by one background thread with a selector loop.

Every turn of the loop, under one lock: sockets that are ready are read and written, requests
from other threads run, due connections open, due windows are produced, keepalives are sent
every second, and each device's new backlog is handed to paho and flushed. The public methods
may be called from any thread; those that touch paho clients run on the loop thread (`_call`).
"""

from __future__ import annotations

import logging
import random
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

from edgefleet.agent.protocol import TopicTree

from .config import SimConfig
from .device import SimDevice
from .scheduling import ConnectPacer, ProductionSchedule
from .selector import raise_fd_limit
from .sessions import Sessions
from .stats import SimStats
from .timers import Timers

log = logging.getLogger(__name__)

MISC_EVERY_S: Final = 1.0  # keepalives and handshake timeouts
STOP_POLL_S: Final = 0.05  # loop wake-up while a graceful stop waits for the broker


class Simulator:
    """N simulated devices driven by one background thread with a selector loop."""

    def __init__(self, cfg: SimConfig) -> None:
        """Prepare the devices; nothing connects before `start`."""
        self.cfg = cfg
        self.tree = TopicTree(cfg.root)
        self._rng = random.Random(cfg.seed)
        self._timers = Timers()  # the stages of installs and rollbacks
        self._devices = [
            SimDevice(cfg, self.tree, i, pos, self._mark_send, self._timers, self._republish)
            for pos, i in enumerate(cfg.indices())
        ]
        self._by_id = {d.device_id: d for d in self._devices}
        self._lock = threading.Lock()
        self._pacer = ConnectPacer(cfg.connect_rate, self._rng)
        self._production = ProductionSchedule()
        self._sessions = Sessions(cfg, self._devices, self._pacer)
        self._io = self._sessions.io
        self._actions: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._paused = False
        self._next_misc = 0.0
        self._thread: threading.Thread | None = None
        self._crashed: BaseException | None = None

    @property
    def last_error(self) -> str | None:
        """The last connection error, for the start timeout."""
        return self._sessions.last_error

    # -- public API ---------------------------------------------------------------------

    def device_ids(self) -> list[str]:
        """Ids of the simulated devices, in index order."""
        return [d.device_id for d in self._devices]

    def start(self, timeout: float | None = None) -> None:
        """Start producing and connecting; return once every device is connected.

        Raises TimeoutError naming how many connected (and the last connection error) when
        they are not all connected within `timeout` seconds (default: scaled to the fleet).
        """
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        raise_fd_limit(len(self._devices) + 256)
        if timeout is None:
            timeout = 10.0 + 2.0 * len(self._devices) / self.cfg.connect_rate
        now = time.monotonic()
        wall = time.time()
        self._sessions.started_at = now
        for dev in self._devices:
            dev.window_end = wall
        self._pacer.start(now, (dev.position for dev in self._devices))
        self._production.spread(self._devices, now, time.time())
        self._sessions.phase = "running"
        self._thread = threading.Thread(target=self._run, name="simulate-loop", daemon=True)
        self._thread.start()
        deadline = now + timeout
        while time.monotonic() < deadline:
            if self._online() == len(self._devices):
                return
            if self._crashed is not None:
                raise RuntimeError(f"simulator loop failed: {self._crashed!r}")
            time.sleep(0.02)
        online = self._online()
        error = self.last_error
        self.stop(graceful=False)
        raise TimeoutError(
            f"only {online} of {len(self._devices)} simulated devices connected to "
            f"{self.cfg.host}:{self.cfg.port} within {timeout:.1f} s"
            + (f" (last error: {error})" if error else "")
        )

    def stop(self, graceful: bool = True) -> None:
        """Stop producing and disconnect every device.

        graceful: publish each device's retained offline status and send DISCONNECT, so no
        Last Will fires; otherwise the sockets are dropped and the broker sends the wills.
        The backlog (unacknowledged messages) is kept in the counters, like the agent's outbox.
        """
        thread = self._thread
        if thread is None:
            self._sessions.phase = "done"
            self._io.close()
            return
        if not thread.is_alive():
            return
        self._call(lambda: self._begin_stop(graceful), timeout=10.0)
        thread.join(15.0)
        if thread.is_alive():
            log.error("simulator loop did not stop within 15 s")

    def take_offline(self, device_ids: list[str]) -> None:
        """Drop these devices' connections ungracefully (wills fire); they keep producing."""
        devs = self._lookup(device_ids)
        self._call(lambda: self._take_offline(devs))

    def bring_online(self, device_ids: list[str]) -> None:
        """Let these devices reconnect: birth, then the backlog replays in order."""
        devs = self._lookup(device_ids)
        self._call(lambda: self._bring_online(devs))

    def pause(self) -> None:
        """Stop producing windows (connections and replay go on); effective on return."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Produce windows again, the next ones starting now."""
        with self._lock:
            if self._paused:
                self._paused = False
                self._production.spread(self._devices, time.monotonic(), time.time())

    def produce_now(self, windows: int = 1, device_ids: list[str] | None = None) -> None:
        """Produce `windows` windows per device immediately, paused or not (for exact counts)."""
        devs = self._lookup(device_ids) if device_ids is not None else list(self._devices)
        with self._lock:
            for dev in devs:
                for _ in range(windows):
                    dev.produce(self._rng, time.time())
        self._io.wake()

    def set_slowdown(self, device_ids: list[str] | None, factor: float) -> None:
        """Multiply these devices' latency (None: every device) by factor from the next window.

        A factor of 1.0 makes them as fast as their class and model say again.
        """
        if not 0 < factor < 1e4:
            raise ValueError(f"slowdown factor must be > 0, got {factor}")
        devs = self._lookup(device_ids) if device_ids is not None else list(self._devices)

        def apply() -> None:
            for dev in devs:
                dev.slowdown = factor
            log.info("latency x %g on %d simulated devices", factor, len(devs))

        self._call(apply)

    def running(self, device_id: str) -> tuple[str | None, int]:
        """Manifest sha256 (None without variants) and operating point a device runs now."""
        (dev,) = self._lookup([device_id])
        with self._lock:
            v = dev.variant
            return (v.manifest_sha256 if v is not None else None, dev.operating_point)

    def stats(self) -> SimStats:
        """A consistent snapshot of every device's counters."""
        with self._lock:
            return SimStats(tuple(d.stats() for d in self._devices))

    def wait_drained(self, timeout: float) -> bool:
        """Wait until no device has an unacknowledged message; False on timeout.

        Windows dropped for a full backlog count as drained (they are in `overflow`).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if all(not d.backlog for d in self._devices):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # -- helpers of the public API ------------------------------------------------------

    def _online(self) -> int:
        with self._lock:
            return sum(1 for d in self._devices if d.state == "online")

    def _lookup(self, device_ids: Iterable[str]) -> list[SimDevice]:
        try:
            return [self._by_id[i] for i in device_ids]
        except KeyError as exc:
            raise ValueError(f"unknown simulated device {exc.args[0]!r}") from None

    def _call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run fn on the loop thread and wait for it (paho clients are not thread-safe)."""
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            if not running:
                fn()  # no loop: nothing else touches the devices
                return
            self._actions.append((fn, done))
        self._io.wake()
        if not done.wait(timeout):
            raise TimeoutError("the simulator loop did not run the request in time")

    def _republish(self, dev: SimDevice) -> None:
        """Another variant runs on dev: its retained status says so at once."""
        self._sessions.republish_birth(dev)

    def _mark_send(self, dev: SimDevice) -> None:
        """A device has a new entry for its connection: hand it to paho this turn."""
        self._sessions.to_pump.add(dev)

    def _take_offline(self, devs: list[SimDevice]) -> None:
        """Drop these connections ungracefully (wills fire) and keep them down."""
        for dev in devs:
            if dev.state in ("held", "stopped"):
                continue
            self._sessions.drop(dev, "held")
            log.info(
                "%s taken offline (ungraceful; its will fires), backlog %d",
                dev.device_id,
                len(dev.backlog),
            )

    def _bring_online(self, devs: list[SimDevice]) -> None:
        """Let held devices connect again, at once."""
        now = time.monotonic()
        for dev in devs:
            if dev.state != "held":
                continue
            dev.state = "waiting"
            dev.retry_delay = 0.0
            self._pacer.now(dev.position, now)
            log.info("%s coming back online, backlog %d", dev.device_id, len(dev.backlog))

    def _begin_stop(self, graceful: bool) -> None:
        self._paused = True
        self._sessions.begin_stop(graceful)

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._sessions.phase != "done":
                events = self._io.select(self._timeout())
                with self._lock:
                    self._turn(events)
        except BaseException as exc:  # recorded for start(); the loop has no caller to raise to
            self._crashed = exc
            log.exception("simulator loop crashed")
        finally:
            with self._lock:
                for dev in self._devices:
                    self._sessions.drop(dev, "stopped")
            self._io.close()

    def _timeout(self) -> float:
        """Seconds until the loop has something to do without network input."""
        now = time.monotonic()
        wake = now + MISC_EVERY_S
        phase = self._sessions.phase
        if phase == "running":
            due = self._production.next_due()
            if due is not None and not self._paused:
                wake = min(wake, due)
            attempt = self._pacer.next_attempt(now, len(self._sessions.connecting))
            if attempt is not None:
                wake = min(wake, attempt)
            step = self._timers.next_due()
            if step is not None:
                wake = min(wake, step)
        elif phase in ("draining", "disconnecting"):
            wake = min(wake, now + STOP_POLL_S)
        return max(0.0, wake - now)

    def _turn(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """One loop iteration, under the lock."""
        self._io.handle(events)
        while self._actions:
            fn, done = self._actions.popleft()
            try:
                fn()
            except Exception:
                log.exception("simulator request failed")
            done.set()
        now = time.monotonic()
        sessions = self._sessions
        if sessions.phase == "running":
            sessions.connect_due(now)
            self._timers.run_due(now)
            if not self._paused:
                wall = time.time()
                for dev in self._production.due(self._devices, now):
                    dev.produce(self._rng, wall)
        elif sessions.phase in ("draining", "disconnecting"):
            sessions.stop_progress(now)
        if now >= self._next_misc:
            self._next_misc = now + MISC_EVERY_S
            sessions.misc(now)
        sessions.pump_all()
        self._io.flush()
