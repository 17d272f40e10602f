"""Which devices get a bundle when: canaries first, then cumulative waves. Pure functions.

Choices the engine relies on:
- Waves are cumulative fractions of the WHOLE group, canaries included: with --canary 10%
  and --waves 10%,50%,100% the canaries already cover the first 10%, so that wave is empty.
  Empty waves are dropped: every wave in a plan has at least one device.
- Sizes round up (ceil), so 10% of 3 devices is 1 device, never 0; a non-empty group always
  gets at least one canary, and never more canaries than devices.
- Order is a hash of (seed, device id): the same rollout id always gives the same plan, and
  another rollout of the same group picks other canaries. Online devices are preferred as
  canaries (an offline canary would hold the soak window up); the rest follow in hash order.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass


class PlanError(ValueError):
    """A canary, wave or duration option that cannot be parsed; the message names the part."""


@dataclass(frozen=True)
class Canary:
    """How many canaries: a count, or a fraction of the group (exactly one is set)."""

    count: int | None = None
    fraction: float | None = None

    def size(self, devices: int) -> int:
        """Canaries for a group of `devices`: at least 1 when the group is not empty."""
        if devices <= 0:
            return 0
        if self.count is not None:
            wanted = self.count
        else:
            assert self.fraction is not None
            wanted = math.ceil(round(self.fraction * devices, 9))
        return max(1, min(devices, wanted))

    @property
    def text(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.fraction is not None
        return f"{_pct(self.fraction)}%"


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")


def parse_canary(text: str) -> Canary:
    """'10%' (a fraction of the group, above 0 and at most 100%) or '3' (at least 1 device)."""
    if m := _PERCENT.match(text):
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise PlanError(f"canary {text!r}: a percentage must be above 0% and at most 100%")
        return Canary(fraction=pct / 100)
    if m := _COUNT.match(text):
        count = int(m.group(1))
        if count < 1:
            raise PlanError(f"canary {text!r}: at least 1 canary device")
        return Canary(count=count)
    raise PlanError(f"canary {text!r}: expected a percentage like '10%' or a count like '3'")


def parse_waves(text: str) -> list[float]:
    """'10%,50%,100%' -> [0.1, 0.5, 1.0]: cumulative, increasing, ending at 100%."""
    parts = text.split(",")
    waves: list[float] = []
    for i, part in enumerate(parts, start=1):
        m = _PERCENT.match(part)
        if m is None:
            raise PlanError(
                f"waves {text!r}: part {i} {part.strip()!r} is not a percentage; expected "
                "cumulative percentages like '10%,50%,100%'"
            )
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise PlanError(f"waves {text!r}: part {i} {part.strip()!r} must be in (0%, 100%]")
        if waves and pct / 100 <= waves[-1]:
            raise PlanError(
                f"waves {text!r}: part {i} {part.strip()!r} does not increase on "
                f"{_pct(waves[-1])}% (waves are cumulative)"
            )
        waves.append(pct / 100)
    if waves[-1] != 1.0:
        raise PlanError(f"waves {text!r}: the last wave must be 100%, got {parts[-1].strip()!r}")
    return waves


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """'90s', '5m', '1h30m', '2h' -> seconds; every number needs a unit (h, m, s)."""
    compact = text.strip().lower()
    pos, total, seen = 0, 0.0, ""
    for m in _DURATION.finditer(compact):
        if m.start() != pos:
            break
        unit = m.group(2)
        if unit in seen or (seen and "hms".index(unit) < "hms".index(seen[-1])):
            raise PlanError(f"duration {text!r}: units must come once each, in order h, m, s")
        seen += unit
        total += float(m.group(1)) * _UNITS[unit]
        pos = m.end()
    if not compact or pos != len(compact):
        bad = compact[pos:] or text
        raise PlanError(
            f"duration {text!r}: cannot read {bad!r}; expected e.g. '90s', '5m' or '1h30m'"
        )
    return total


def plan(
    devices: Sequence[str],
    canary: Canary,
    waves: Sequence[float],
    seed: str,
    online: Collection[str] = frozenset(),
) -> list[list[str]]:
    """Wave 0 = canaries, then the waves; every device exactly once, deterministic per seed."""
    unique = sorted(set(devices))
    n = len(unique)
    if n == 0:
        return []
    if not waves or waves[-1] != 1.0 or any(b <= a for a, b in itertools.pairwise(waves)):
        raise PlanError(f"waves {list(waves)} must increase and end at 1.0 (100%)")
    order = sorted(unique, key=lambda d: _rank(seed, d))
    k = canary.size(n)
    first = [d for d in order if d in online] + [d for d in order if d not in online]
    canaries = first[:k]
    chosen = set(canaries)
    rest = [d for d in order if d not in chosen]
    result = [canaries]
    done = k
    for fraction in waves:
        upto = max(done, min(n, math.ceil(round(fraction * n, 9))))
        if upto > done:
            result.append(rest[done - k : upto - k])
            done = upto
    return result


def _rank(seed: str, device: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{device}".encode()).digest()


def _pct(fraction: float) -> str:
    pct = round(fraction * 100, 6)
    return str(int(pct)) if pct == int(pct) else str(pct)
