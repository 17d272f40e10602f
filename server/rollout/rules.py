"""Halt rules of a rollout: parse "p95_ms>40" and judge the canaries' telemetry against them.

Pure functions, no I/O: the rollout engine feeds them windows read from the store.

How the canaries' windows are pooled (one number per metric over every window of every
canary, not one per device):
- per-window values (p50_ms, p95_ms, power_w, energy_per_frame_mj, temperature_c,
  cpu_percent) are frame-weighted means: a window that processed 300 frames counts 300 times
  as much as one that processed 1. A window without frames measured nothing and weighs zero;
  a window that lacks the value (no power meter, no temperature sensor) is left out;
- fps is total frames processed over total window seconds, the average rate of a canary
  (a frame-weighted mean of fps would favour the fast windows);
- rates are ratios of sums over all windows: exit_rate = 1 - frames at the final head / all
  frames of the exit histograms; dropped_rate = frames dropped / frames captured;
  error_rate = error events / frames processed.
Pooling by frames makes a busy canary count more than an idle one, which is what a p95 means
to the fleet; a canary that sent one bad window among many good ones does not halt alone.

A relative rule ("p95_ms>1.5x") compares with the same metric pooled over the same devices'
windows before the install (windows_before).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from edgefleet.agent.protocol import Telemetry

Op = Literal[">", ">=", "<", "<="]
VerdictState = Literal["ok", "breached", "insufficient"]

METRICS: dict[str, str] = {
    "p50_ms": "median latency, ms",
    "p95_ms": "95th percentile latency, ms",
    "fps": "frames processed per second",
    "exit_rate": "fraction of frames that left at an early exit",
    "error_rate": "error events per frame processed",
    "power_w": "power draw, W",
    "energy_per_frame_mj": "energy per frame, mJ",
    "temperature_c": "SoC temperature, degrees C",
    "cpu_percent": "agent CPU, 100 per core",
    "dropped_rate": "fraction of captured frames dropped",
}

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
# Longer operators first, so ">=" is not read as ">" followed by "=40".
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*(\S+?)\s*$")
FORM = 'METRIC OP NUMBER or METRIC OP FACTORx, e.g. "p95_ms>40" or "p95_ms>1.5x"'


class RuleError(ValueError):
    """A halt rule that cannot be parsed; the message shows the expected form."""


@dataclass(frozen=True)
class HaltRule:
    """Halt when `metric op threshold` holds (threshold times the baseline when relative)."""

    metric: str
    op: Op
    threshold: float
    relative: bool = False

    @property
    def text(self) -> str:
        """The rule as an operator writes it (parse_rule(rule.text) == rule)."""
        t = self.threshold
        number = str(int(t)) if t == int(t) and abs(t) < 1e15 else repr(t)
        return f"{self.metric}{self.op}{number}{'x' if self.relative else ''}"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Breach:
    """One rule that held: the measured value and the limit it crossed."""

    rule: HaltRule
    value: float
    limit: float  # the threshold, or factor * baseline for a relative rule
    baseline: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The canaries' telemetry judged against every rule."""

    state: VerdictState
    breaches: tuple[Breach, ...]
    values: dict[str, float | None]  # every ruled metric, pooled over windows_after
    baselines: dict[str, float | None]  # the same over windows_before (relative rules only)
    windows: int
    devices: int
    reason: str


def _known() -> str:
    return ", ".join(METRICS)


def parse_rule(text: str) -> HaltRule:
    """Parse "p95_ms>40" or "p95_ms>1.5x"; RuleError names what was wrong."""
    m = _RULE.match(text)
    if m is None:
        raise RuleError(f"halt rule {text!r}: expected {FORM}; metrics: {_known()}")
    metric, op, number = m.groups()
    if metric not in METRICS:
        raise RuleError(
            f"halt rule {text!r}: unknown metric {metric!r}; known metrics: {_known()} "
            f"(form: {FORM})"
        )
    relative = number.endswith(("x", "X"))
    digits = number[:-1] if relative else number
    try:
        threshold = float(digits)
    except ValueError:
        raise RuleError(f"halt rule {text!r}: {number!r} is not a number (form: {FORM})") from None
    if not math.isfinite(threshold) or (relative and threshold <= 0):
        raise RuleError(
            f"halt rule {text!r}: {number!r} must be a finite number"
            f"{' above 0' if relative else ''} (form: {FORM})"
        )
    return HaltRule(metric, op, threshold, relative)  # type: ignore[arg-type]


def parse_rules(texts: Sequence[str]) -> list[HaltRule]:
    """Every rule of a --halt-if list, in order."""
    return [parse_rule(t) for t in texts]


def pooled(metric: str, windows: Sequence[Telemetry], error_events: int = 0) -> float | None:
    """One metric over all windows as the module docstring says; None when nothing measured it."""
    if metric not in METRICS:
        raise RuleError(f"unknown metric {metric!r}; known metrics: {_known()}")
    frames = sum(w.frames_processed for w in windows)
    if metric == "fps":
        seconds = sum(w.window_end - w.window_start for w in windows)
        if seconds > 0:
            return frames / seconds
        return _weighted([(w.fps, w.frames_processed) for w in windows])
    if metric == "exit_rate":
        total = sum(sum(w.exit_histogram) for w in windows)
        final = sum(w.exit_histogram[-1] for w in windows)
        return 1.0 - final / total if total else None
    if metric == "dropped_rate":
        captured = sum(w.frames_captured for w in windows)
        return sum(w.frames_dropped for w in windows) / captured if captured else None
    if metric == "error_rate":
        return error_events / frames if frames else None
    values = [(v, w.frames_processed) for w in windows if (v := _value(metric, w)) is not None]
    return _weighted(values)


def _value(metric: str, w: Telemetry) -> float | None:
    if metric == "p50_ms":
        return w.latency_ms.p50
    if metric == "p95_ms":
        return w.latency_ms.p95
    value: float | None = getattr(w, metric)
    return value


def _weighted(pairs: Sequence[tuple[float, int]]) -> float | None:
    weight = sum(n for _, n in pairs)
    if weight == 0:
        return None
    return sum(v * n for v, n in pairs) / weight


def evaluate(
    rules: Sequence[HaltRule],
    windows_after: Sequence[Telemetry],
    windows_before: Sequence[Telemetry],
    error_events: int,
    min_windows: int = 2,
    *,
    error_events_before: int = 0,
) -> Verdict:
    """Judge the canaries' windows since the install against the rules.

    breached: at least one rule held (even when another could not be judged yet);
    insufficient: fewer than min_windows windows, or a rule's metric (or, for a relative
    rule, its baseline) was not measured; ok: every rule judged and none held.
    """
    devices = len({w.device_id for w in windows_after})
    n = len(windows_after)
    where = f"over {n} window{'s' * (n != 1)} from {devices} canar{'ies' if devices != 1 else 'y'}"
    values = {r.metric: pooled(r.metric, windows_after, error_events) for r in rules}
    # A relative error_rate rule needs error_events_before (the same devices' errors over
    # windows_before); without any, its baseline is 0 and the rule cannot be judged.
    baselines = {
        r.metric: pooled(r.metric, windows_before, error_events_before) for r in rules if r.relative
    }
    if n < min_windows:
        return Verdict(
            "insufficient",
            (),
            values,
            baselines,
            n,
            devices,
            f"{n} window{'s' * (n != 1)} from {devices} canar{'ies' if devices != 1 else 'y'}, "
            f"need {min_windows}",
        )
    breaches: list[Breach] = []
    missing: list[str] = []
    for rule in rules:
        value = values[rule.metric]
        if value is None:
            missing.append(f"no {rule.metric} measured")
            continue
        baseline = baselines.get(rule.metric) if rule.relative else None
        if rule.relative:
            if not baseline:
                missing.append(f"no {rule.metric} baseline before the install for {rule.text}")
                continue
            limit = rule.threshold * baseline
        else:
            limit = rule.threshold
        if _OPS[rule.op](value, limit):
            breaches.append(Breach(rule, value, limit, baseline))
    if breaches:
        reason = "; ".join(_describe(b) for b in breaches) + f" {where}"
        return Verdict("breached", tuple(breaches), values, baselines, n, devices, reason)
    if missing:
        return Verdict(
            "insufficient", (), values, baselines, n, devices, "; ".join(missing) + f" {where}"
        )
    shown = ", ".join(f"{r.metric} {_num(values[r.metric])}" for r in rules)
    return Verdict("ok", (), values, baselines, n, devices, f"{shown or 'no rules'} {where}")


def _describe(b: Breach) -> str:
    if b.rule.relative and b.baseline is not None:
        return (
            f"{b.rule.metric} {_num(b.value)} {b.rule.op} {_num(b.rule.threshold)}x baseline "
            f"{_num(b.baseline)} (= {_num(b.limit)})"
        )
    return f"{b.rule.metric} {_num(b.value)} {b.rule.op} {_num(b.limit)}"


def _num(x: float | None) -> str:
    """Three significant-ish digits for a one-line reason; integers without a '.0'."""
    if x is None:
        return "n/a"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}"
