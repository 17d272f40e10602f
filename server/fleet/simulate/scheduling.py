"""When things happen in the simulator: paced connection attempts, and each device's windows.

Connections are paced by `connect_rate` and held back for a growing moment after a failed
attempt (a broker that is down is not hammered by a thousand clients). Windows are spread over
one period so the load is smooth, and a loop turn produces at most PRODUCE_BUDGET of them, so
I/O keeps up when the loop is overloaded.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from .device import SimDevice

# Shorter than the agent's 1..30 s backoff so that tests and benchmarks recover within seconds
# of a broker restart; the global gate below still keeps a dead broker from being hammered.
RETRY_MIN_S: Final = 0.25
RETRY_MAX_S: Final = 2.0
MAX_CONNECTING: Final = 256  # handshakes in progress at once
PRODUCE_BUDGET: Final = 2_000  # windows per loop turn


class ConnectPacer:
    """Which devices (by position) may start a connection attempt, and when."""

    def __init__(self, rate: float, rng: random.Random) -> None:
        self.rate = rate
        self._rng = rng
        self._heap: list[tuple[float, int]] = []  # (not before, position)
        self._tokens = 1.0
        self._tick = 0.0
        self._gate_until = 0.0  # no attempts before this (the broker refused recently)
        self._gate_delay = 0.0

    def start(self, now: float, positions: Iterable[int]) -> None:
        """Every device may connect from now on, paced."""
        self._tick = now
        for position in positions:
            heapq.heappush(self._heap, (now, position))

    def now(self, position: int, now: float) -> None:
        """This device may connect again from now on (it was held offline)."""
        heapq.heappush(self._heap, (now, position))

    def retry(self, position: int, delay: float, now: float) -> float:
        """Schedule another attempt after a backoff grown from `delay`; returns the new delay."""
        delay = min(RETRY_MAX_S, max(RETRY_MIN_S, delay * 2))
        when = now + delay * self._rng.uniform(0.5, 1.0)  # jitter: no thundering herd
        heapq.heappush(self._heap, (when, position))
        return delay

    def failed(self, now: float) -> None:
        """An attempt failed outright: the broker is probably down, hold every attempt a while."""
        self._gate_delay = min(RETRY_MAX_S, max(0.1, self._gate_delay * 2))
        self._gate_until = now + self._gate_delay

    def succeeded(self) -> None:
        """A connection was accepted: the gate no longer grows from its last delay."""
        self._gate_delay = 0.0

    def due(
        self, now: float, connecting: Callable[[], int], ready: Callable[[int], bool]
    ) -> Iterator[int]:
        """Positions to open now; `ready` skips stale entries, `connecting` counts handshakes.

        A generator: the conditions are checked again after the caller opened each one.
        """
        rate = self.rate
        # Bursts up to a quarter second's worth, so a long loop turn does not halve the rate.
        self._tokens = min(max(1.0, rate * 0.25), self._tokens + (now - self._tick) * rate)
        self._tick = now
        heap = self._heap
        while (
            heap
            and heap[0][0] <= now
            and now >= self._gate_until
            and self._tokens >= 1.0
            and connecting() < MAX_CONNECTING
        ):
            _, position = heapq.heappop(heap)
            if not ready(position):
                continue  # stale entry: the device was held or is already connecting
            self._tokens -= 1.0
            yield position

    def next_attempt(self, now: float, connecting: int) -> float | None:
        """When the next attempt may start, or None when none is waiting for time."""
        if not self._heap or connecting >= MAX_CONNECTING:  # else a CONNACK wakes the loop
            return None
        # Not before the gate opens, nor before the pacing allows the next attempt.
        paced = now + max(0.0, 1.0 - self._tokens) / self.rate
        return max(self._heap[0][0], self._gate_until, paced)


class ProductionSchedule:
    """When each device's next window is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []  # (due, position)

    def spread(self, devices: Sequence[SimDevice], now: float, wall: float) -> None:
        """Spread the devices' next windows over one period so the load is smooth."""
        n = len(devices)
        heap: list[tuple[float, int]] = []
        for dev in devices:
            dev.window_end = max(dev.window_end, wall)
            heap.append((now + dev.period * (dev.position + 1) / n, dev.position))
        heapq.heapify(heap)
        self._heap = heap

    def due(self, devices: Sequence[SimDevice], now: float) -> Iterator[SimDevice]:
        """Devices whose window is due, at most PRODUCE_BUDGET; each is rescheduled after."""
        heap = self._heap
        budget = PRODUCE_BUDGET
        while heap and heap[0][0] <= now and budget > 0:
            due, position = heap[0]
            dev = devices[position]
            yield dev
            budget -= 1
            nxt = due + dev.period
            if nxt <= now:
                nxt = now + dev.period  # more than a period behind: skip, the window gets longer
            heapq.heapreplace(heap, (nxt, position))

    def next_due(self) -> float | None:
        """When the next window is due, or None without devices."""
        return self._heap[0][0] if self._heap else None
