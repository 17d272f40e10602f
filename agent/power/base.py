"""Common interface of power readers, and the maths that turns samples into energy per frame."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

from edgefleet.agent.protocol.messages import PowerSource

Clock = Callable[[], float]
ReadText = Callable[[Path], str]


class SensorError(Exception):
    """A reading could not be taken; the message names the file or command at fault."""

    def __init__(self, where: Path | str, message: str) -> None:
        self.where = str(where)
        self.detail = message
        super().__init__(f"{self.where}: {message}")


@dataclass(frozen=True)
class Probe:
    """Whether a source works here, and why (or why not) in words for the log."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class PowerSample:
    """One reading: monotonic seconds, instantaneous watts and/or cumulative joules, or an error."""

    ts: float
    power_w: float | None = None
    energy_j: float | None = None
    error: str | None = None


def sysfs(root: Path | str, path: str) -> Path:
    """`path` (absolute, as on a device) inside `root`, so tests can use a fake tree."""
    return Path(root) / path.lstrip("/")


def read_text(path: Path) -> str:
    """The stripped text of a sysfs or procfs file."""
    return path.read_text(encoding="utf-8", errors="replace").strip()


def read_number(
    path: Path, read: ReadText = read_text, *, denied: str = "permission denied"
) -> float:
    """A finite number from a sysfs file; every failure becomes a SensorError naming the file."""
    try:
        text = read(path)
    except PermissionError:
        raise SensorError(path, denied) from None
    except OSError as exc:
        raise SensorError(path, exc.strerror or type(exc).__name__) from None
    # Some drivers append a unit ("32760 ma"); the number is always the first word.
    word = text.split(maxsplit=1)[0] if text else ""
    try:
        value = float(word)
    except ValueError:
        raise SensorError(path, f"not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise SensorError(path, f"not a finite number: {text[:40]!r}")
    return value


class PowerReader(ABC):
    """A source of instantaneous power and/or a cumulative energy counter."""

    name: ClassVar[PowerSource]

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock

    @abstractmethod
    def read(self) -> tuple[float | None, float | None]:
        """(watts now, cumulative joules); raises SensorError when it cannot."""

    def describe(self) -> str:
        """What this reader measures, for the log and the operator."""
        return self.name

    def sample(self) -> PowerSample:
        """One timestamped reading; never raises, an error is carried in the sample."""
        ts = self._clock()
        try:
            power_w, energy_j = self.read()
        except SensorError as exc:
            return PowerSample(ts, error=str(exc))
        except Exception as exc:
            # An unforeseen file format must cost one sample, never the agent's main loop.
            return PowerSample(ts, error=f"{self.name}: {type(exc).__name__}: {exc}")
        if power_w is None and energy_j is None:
            return PowerSample(ts, error=f"{self.name}: no reading")
        return PowerSample(ts, power_w, energy_j)

    def probe(self) -> Probe:
        """Take one sample to find out whether this source works here."""
        sample = self.sample()
        if sample.error is not None:
            return Probe(False, sample.error)
        return Probe(True, self.describe())


class NoPowerReader(PowerReader):
    """No power measurement at all (switched off in the config)."""

    name: ClassVar[PowerSource] = "none"

    def read(self) -> tuple[float | None, float | None]:
        """Always fails: there is nothing to read."""
        raise SensorError("power", "no power source configured")


def counter_delta(previous: float, current: float, wrap: float | None) -> float | None:
    """Increase of a cumulative counter that wraps at `wrap`; None if it went back without one."""
    if current >= previous:
        return current - previous
    if wrap is None or wrap <= 0 or previous > wrap:
        return None
    return wrap - previous + current


def trapezoid_energy_j(points: Sequence[tuple[float, float]]) -> float:
    """Joules under time-ordered (seconds, watts) points by the trapezoid rule."""
    return sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in pairwise(points))


def window_power(samples: Sequence[PowerSample]) -> tuple[float | None, float | None, float]:
    """(average watts, joules, seconds spanned) of time-ordered samples.

    A cumulative counter is exact, so it wins; instantaneous power is integrated.
    """
    counted = [(s.ts, s.energy_j) for s in samples if s.error is None and s.energy_j is not None]
    if len(counted) >= 2:
        (t0, e0), (t1, e1) = counted[0], counted[-1]
        span = t1 - t0
        energy = e1 - e0
        # A counter that went back (driver reset) says nothing; fall back to power samples.
        if span > 0 and energy >= 0:
            return energy / span, energy, span
    powered = [(s.ts, s.power_w) for s in samples if s.error is None and s.power_w is not None]
    if not powered:
        return None, None, 0.0
    if len(powered) == 1:
        return powered[0][1], None, 0.0
    span = powered[-1][0] - powered[0][0]
    if span <= 0:
        return sum(p for _, p in powered) / len(powered), None, 0.0
    energy = trapezoid_energy_j(powered)
    return energy / span, energy, span


def energy_per_frame_mj(power_w: float | None, seconds: float, frames: int) -> float | None:
    """Millijoules per processed frame at `power_w` over `seconds`; None without power or frames."""
    if power_w is None or frames <= 0 or seconds <= 0:
        return None
    return power_w * seconds / frames * 1000.0


@dataclass(frozen=True)
class PowerWindow:
    """Power over one telemetry window, ready for the Telemetry message."""

    source: PowerSource
    power_w: float | None
    energy_j: float | None
    span_s: float
    energy_per_frame_mj: float | None
    error: str | None = None


class PowerMeter:
    """Collects the samples of one reader and closes telemetry windows."""

    def __init__(self, source: PowerSource, max_samples: int = 3600) -> None:
        self.source: PowerSource = source
        self._samples: deque[PowerSample] = deque(maxlen=max(2, max_samples))
        self._fresh = 0
        self._last_error: str | None = None

    def add(self, sample: PowerSample) -> None:
        """Record one sample; failed ones only remember their error."""
        if sample.error is not None:
            self._last_error = sample.error
            return
        self._samples.append(sample)
        self._fresh += 1

    def close(self, frames: int, window_s: float) -> PowerWindow:
        """Power and energy per frame over the last `window_s` seconds; then a new window."""
        if self._fresh == 0:
            power_w, energy_j, span = None, None, 0.0
        else:
            power_w, energy_j, span = window_power(list(self._samples))
        error = None
        if power_w is None:
            error = self._last_error or "no power sample in the window"
        last = self._samples[-1] if self._samples else None
        self._samples.clear()
        # The next window's delta or integral starts where this one ended, so no time is lost.
        if last is not None:
            self._samples.append(last)
        self._fresh = 0
        self._last_error = None
        return PowerWindow(
            source=self.source,
            power_w=power_w,
            energy_j=energy_j,
            span_s=span,
            energy_per_frame_mj=energy_per_frame_mj(power_w, window_s, frames),
            error=error,
        )
