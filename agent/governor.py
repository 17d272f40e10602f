"""The governor: steps between operating points when the device is slow, hot or throttled.

Operating points run from accurate (index 0) to fast (last). Under pressure the governor
steps one point faster per window, at once; it steps back only after `windows_to_recover`
calm windows in a row, so a device hovering near its limit does not flap. It never goes more
accurate than the default: the default is the point the optimizer chose for this bundle, and
spare headroom is the coordinator's to spend (by pinning), not a guess made on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.agent.config import GovernorConfig


@dataclass(frozen=True)
class Move:
    """A change of operating point, with the one-line reason for the event."""

    from_index: int
    to_index: int
    reason: str


class Governor:
    """A state machine fed once per telemetry window; pure, the caller applies the moves."""

    def __init__(self, cfg: GovernorConfig, n_points: int, default: int) -> None:
        if n_points < 1:
            raise ValueError(f"need >= 1 operating point, got {n_points}")
        if not 0 <= default < n_points:
            raise ValueError(f"default operating point {default} outside 0..{n_points - 1}")
        self.cfg = cfg
        self.n_points = n_points
        self.default = default
        self._current = default
        self.target_ms = cfg.target_p95_ms
        self.pinned = False
        self.calm_windows = 0

    @property
    def current(self) -> int:
        """Index of the active operating point."""
        return self._current

    @current.setter
    def current(self, index: int) -> None:
        # An unpinned set from the coordinator: the governor carries on from the new point.
        self._check(index)
        self._current = index
        self.calm_windows = 0

    @property
    def fastest(self) -> int:
        """Index of the fastest operating point."""
        return self.n_points - 1

    def pin(self, index: int) -> Move | None:
        """Fix the point (a coordinator command) and stop moving until unpin()."""
        self._check(index)
        self.pinned = True
        self.calm_windows = 0
        return self._go(index, f"pinned to {index} by the coordinator")

    def unpin(self) -> None:
        """Let the governor move again, from wherever the pin left it."""
        self.pinned = False
        self.calm_windows = 0

    def set_target(self, ms: float | None) -> None:
        """Change the p95 latency target; None leaves only temperature and throttling."""
        if ms is not None and not ms > 0:
            raise ValueError(f"latency target must be > 0 ms, got {ms}")
        self.target_ms = ms
        self.calm_windows = 0  # calm under the old target says nothing about the new one

    def update(
        self, p95_ms: float | None, temperature_c: float | None, throttled: bool | None
    ) -> Move | None:
        """Take one window's p95 latency, temperature and throttling; maybe move one step."""
        if self.pinned or not self.cfg.enabled or self.n_points == 1:
            return None
        pressure = self._pressure(p95_ms, temperature_c, throttled)
        if pressure:
            self.calm_windows = 0
            if self._current >= self.fastest:
                return None
            return self._go(self._current + 1, "; ".join(pressure))
        calm = self._calm(p95_ms)
        if calm is None:
            self.calm_windows = 0  # "in a row": a middling or empty window breaks the streak
            return None
        self.calm_windows += 1
        # Only back toward the default; a point more accurate than it comes from a pin.
        if self._current <= self.default or self.calm_windows < self.cfg.windows_to_recover:
            return None
        return self._go(self._current - 1, f"recovered: {calm} for {self.calm_windows} windows")

    def _pressure(
        self, p95_ms: float | None, temperature_c: float | None, throttled: bool | None
    ) -> list[str]:
        reasons = []
        if self.target_ms is not None and p95_ms is not None and p95_ms > self.target_ms:
            reasons.append(f"p95 {p95_ms:.1f} ms > target {self.target_ms:g} ms")
        if temperature_c is not None and temperature_c >= self.cfg.hot_c:
            reasons.append(f"temperature {temperature_c:.1f} C >= {self.cfg.hot_c:g} C")
        if throttled:
            reasons.append("throttled")
        return reasons

    def _calm(self, p95_ms: float | None) -> str | None:
        """Why this unpressured window counts as calm, or None when it does not."""
        if self.target_ms is None:
            return "not hot or throttled"
        if p95_ms is None:
            return None  # no frames, no evidence that the device keeps up
        limit = self.target_ms * self.cfg.recover_margin
        return f"p95 {p95_ms:.1f} ms < {limit:.1f} ms" if p95_ms < limit else None

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n_points:
            raise ValueError(f"operating point {index} outside 0..{self.fastest}")

    def _go(self, index: int, reason: str) -> Move | None:
        if index == self._current:
            return None
        move = Move(self._current, index, reason)
        self._current = index
        self.calm_windows = 0
        return move
