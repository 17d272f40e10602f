"""What the closed loop does for one device: stay, go faster, or go back toward accuracy.

Pure (no store, no clock, no broker): the engine feeds it each device's streaks and the
predicted latency of every candidate on that device, and carries out what comes back.

The rules, with their hysteresis:
* A device **misses** after `miss_windows` windows in a row with p95 above the target. It then
  gets the most accurate candidate (a variant at an operating point, at or above the accuracy
  floor) predicted at or under `headroom` x target on this device. Choosing below the target,
  not at it, is what keeps a device that just moved from missing again on noise.
* A device is **far under** after `under_windows` windows in a row with p95 below `far_under` x
  target. It moves to the most accurate candidate predicted under `headroom` x target, only
  when that gains at least `min_gain` accuracy. A device between far_under and 1 x target
  stays where it is: the dead band is the second half of the hysteresis.
* A configuration a device left because it missed is **blocked** for that device until the
  device runs `relief` x faster than when it left (its neighbour process went away): a
  prediction said it fits, the device said it does not, and the device wins.
* Nothing happens to a device in its cool-down (the engine's part: streaks only count
  windows of the current configuration, begun after the last change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgefleet.server.retune.latency import Config, Prediction


@dataclass(frozen=True)
class LoopSettings:
    """The loop's thresholds (docs/closedloop.md explains each)."""

    miss_windows: int = 3
    under_windows: int = 6
    headroom: float = 0.85
    far_under: float = 0.5
    min_gain: float = 0.002
    relief: float = 0.7
    cooldown_s: float = 30.0
    canary: str = "10%"
    soak_s: float = 30.0
    pin_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.miss_windows < 1 or self.under_windows < 1:
            raise ValueError("miss_windows and under_windows must be >= 1")
        if not 0 < self.far_under < self.headroom <= 1:
            raise ValueError(
                f"need 0 < far_under ({self.far_under}) < headroom ({self.headroom}) <= 1"
            )
        if not 0 < self.relief < 1:
            raise ValueError(f"relief must be in (0, 1), got {self.relief}")


@dataclass(frozen=True)
class Candidate:
    """A variant at an operating point the loop may move a device to."""

    variant_id: str
    config: Config
    point_name: str
    val_accuracy: float  # validation split: the test split never chooses


@dataclass(frozen=True)
class DeviceState:
    """One device as the policy sees it."""

    device_id: str
    device_class: str
    config: Config | None  # None: it runs nothing the catalogue knows
    p95_ms: float | None  # its running estimate on the current configuration
    miss_streak: int
    under_streak: int
    factor: float  # its p95 / its class's p95 on the same configuration (1: typical)
    blocked: dict[Config, float] = field(default_factory=dict)  # config -> factor when left


Trigger = Literal["miss", "far_under"]


@dataclass(frozen=True)
class Choice:
    """Where a device should go, and the numbers behind it."""

    trigger: Trigger
    candidate: Candidate
    predicted_ms: float  # on this device (class figure x factor)
    prediction: Prediction  # the class figure and its basis
    meets_target: bool  # False: the fastest allowed candidate, still predicted over target


@dataclass(frozen=True)
class NoChoice:
    """A trigger with nothing to go to; the engine may build a faster variant."""

    trigger: Trigger
    reason: str


def triggered(dev: DeviceState, s: LoopSettings) -> Trigger | None:
    """Which rule a device's streaks set off, if any."""
    if dev.miss_streak >= s.miss_windows:
        return "miss"
    if dev.under_streak >= s.under_windows:
        return "far_under"
    return None


def allowed(dev: DeviceState, cand: Candidate, floor: float | None, s: LoopSettings) -> bool:
    """At or above the floor, and not blocked on this device (unless it got faster since)."""
    if floor is not None and cand.val_accuracy < floor - 1e-12:
        return False
    left_at = dev.blocked.get(cand.config)
    return left_at is None or dev.factor <= left_at * s.relief


def decide(
    dev: DeviceState,
    candidates: list[Candidate],
    predictions: dict[Config, Prediction],
    target_ms: float,
    floor: float | None,
    s: LoopSettings,
) -> Choice | NoChoice | None:
    """The move for one device (None: stay); predictions are class figures for its class."""
    trigger = triggered(dev, s)
    if trigger is None:
        return None
    limit = target_ms * s.headroom
    scored: list[tuple[Candidate, float, Prediction]] = []
    for cand in candidates:
        pred = predictions.get(cand.config)
        if pred is None or not allowed(dev, cand, floor, s):
            continue
        scored.append((cand, pred.p95_ms * dev.factor, pred))
    fitting = [x for x in scored if x[1] <= limit]
    current = next((c for c in candidates if c.config == dev.config), None)
    if trigger == "far_under":
        if not fitting or current is None:
            return None
        cand, ms, pred = max(fitting, key=lambda x: (x[0].val_accuracy, -x[1]))
        if cand.val_accuracy < current.val_accuracy + s.min_gain:
            return None
        return Choice(trigger, cand, ms, pred, True)
    if fitting:
        cand, ms, pred = max(fitting, key=lambda x: (x[0].val_accuracy, -x[1]))
        if cand.config == dev.config:
            return None  # predicted to fit where it is: the class figure disagrees with it
        return Choice(trigger, cand, ms, pred, True)
    if not scored:
        return NoChoice(trigger, "no variant at or above the accuracy floor is known")
    # Nothing fits: the fastest allowed candidate, when it is clearly faster than now.
    cand, ms, pred = min(scored, key=lambda x: (x[1], -x[0].val_accuracy))
    now = dev.p95_ms
    if cand.config == dev.config or (now is not None and ms >= now * s.headroom):
        return NoChoice(
            trigger,
            f"no candidate predicted under {limit:.1f} ms on this device "
            f"(fastest: {cand.variant_id} {cand.point_name} {ms:.1f} ms)",
        )
    return Choice(trigger, cand, ms, pred, False)
