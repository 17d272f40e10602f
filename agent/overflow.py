"""When to report outbox overflow: at the first drop, then at most once per `every_s`.

A full outbox drops a message every telemetry window for as long as the broker stays away
(hours, on a device that lost its network), so one event per drop would itself fill the
outbox. The first drop is reported at once; drops after it are gathered and reported with
their count at most once per `every_s`, including the last ones after drops stop, so every
drop is in some event within `every_s`. Pure: the caller passes the counts and the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

EVERY_S: Final = 60.0


@dataclass(frozen=True)
class OverflowReport:
    """One `outbox_overflow` event: what to say and its machine-readable details."""

    message: str
    details: dict[str, int]


class OverflowReporter:
    """Turns the outbox's cumulative drop counts into rate-limited reports."""

    def __init__(self, reported_total: int = 0, every_s: float = EVERY_S) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.every_s = every_s
        self.reported_total = reported_total  # drops already covered by a report
        self._last_at: float | None = None

    def check(self, by_kind: Mapping[str, int], now: float) -> OverflowReport | None:
        """A report when there are unreported drops and the rate limit allows one.

        by_kind is the outbox's persisted count of drops by message kind; now is a monotonic
        clock in seconds.
        """
        total = sum(by_kind.values())
        new = total - self.reported_total
        if new <= 0:
            return None
        if self._last_at is not None and now - self._last_at < self.every_s:
            return None
        self._last_at = now
        self.reported_total = total
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items()) if v)
        message = f"outbox full: dropped {new} message(s), {total} in all ({kinds})"
        details = {"dropped": new, "total": total}
        details.update({f"total_{k}": v for k, v in sorted(by_kind.items())})
        return OverflowReport(message, details)
