"""Steps the loop thread runs at a given time: the stages of simulated installs and rollbacks."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Timers:
    """Callables due at monotonic times, run in due order (ties in the order they were set)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, due: float, step: Callable[[], None]) -> None:
        """Run `step` on the first loop turn at or after `due` (time.monotonic)."""
        heapq.heappush(self._heap, (due, next(self._order), step))

    def next_due(self) -> float | None:
        """When the next step is due, or None when none is set."""
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> None:
        """Run every step due by `now`, including those a step sets for now."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, step = heapq.heappop(heap)
            step()
