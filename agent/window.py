"""The telemetry window: per-frame latencies and exits in, one window's statistics out.

Pure bookkeeping, no clock and no I/O: the caller passes every timestamp, so the maths is
testable alone. Memory is bounded: each latency series keeps at most `max_samples` values by
reservoir sampling (Vitter's algorithm R), so a 1000 fps camera over a long window costs
the same as a slow one and the percentiles stay an unbiased sample of the whole window
(a ring buffer would only describe its last seconds).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.protocol.messages import MAX_COUNTED_CLASSES, Percentiles

MAX_SAMPLES = 10_000
ZERO = Percentiles(p50=0.0, p95=0.0, p99=0.0)


def percentiles(samples: list[float]) -> Percentiles:
    """p50/p95/p99 of the samples; all zero when there are none."""
    if not samples:
        return ZERO
    p50, p95, p99 = np.percentile(np.asarray(samples, dtype=np.float64), [50, 95, 99])
    # Interpolation rounding can put p95 a hair below p50 on near-equal samples, and the
    # Percentiles model rejects any disorder: force the order it checks.
    p95 = max(p95, p50)
    p99 = max(p99, p95)
    return Percentiles(p50=float(p50), p95=float(p95), p99=float(p99))


class Reservoir:
    """A uniform sample of at most `size` values out of everything added."""

    def __init__(self, size: int, rng: random.Random) -> None:
        if size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = rng

    def add(self, value: float) -> None:
        """Offer one value; it replaces a kept one with probability size / seen."""
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.values[slot] = value


@dataclass(frozen=True)
class WindowStats:
    """One closed window; field names equal `agent.protocol.Telemetry`'s where they overlap."""

    window_start: float
    window_end: float
    frames_captured: int
    frames_processed: int
    frames_dropped: int
    fps: float
    latency_ms: Percentiles
    stage_latency_ms: list[Percentiles]
    exit_histogram: list[int]
    latency_samples: int = 0  # how many latencies the percentiles rest on (not in Telemetry)
    # Detectors only; None for a classifier, whose telemetry then has no such keys.
    frames_skipped: int | None = None
    object_counts: dict[str, int] | None = None
    objects_started: int | None = None

    def telemetry_fields(self) -> dict[str, Any]:
        """The fields Telemetry shares, as keyword arguments for it."""
        detector = (
            {
                "frames_skipped": self.frames_skipped,
                "object_counts": _bounded_counts(self.object_counts or {}),
                "objects_started": self.objects_started,
            }
            if self.frames_skipped is not None
            else {}
        )
        return {
            **detector,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "frames_captured": self.frames_captured,
            "frames_processed": self.frames_processed,
            "frames_dropped": self.frames_dropped,
            "fps": self.fps,
            "latency_ms": self.latency_ms,
            "stage_latency_ms": list(self.stage_latency_ms),
            "exit_histogram": list(self.exit_histogram),
        }


def _bounded_counts(counts: dict[str, int]) -> dict[str, int]:
    """The counts as Telemetry takes them: the 100 largest, labels cut to 64 characters."""
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_COUNTED_CLASSES]
    out: dict[str, int] = {}
    for label, n in top:
        key = label[:64] or "?"
        out[key] = max(out.get(key, 0), n)
    return out


def _check_ms(value: float, what: str) -> float:
    # A NaN or negative latency would poison the percentiles and fail Telemetry validation
    # a whole window later, far from the frame that caused it.
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return float(value)


def _delta(total: int, previous: int) -> int:
    # A recreated camera restarts its counters at zero: then its whole total is new.
    return total - previous if total >= previous else total


class TelemetryWindow:
    """Accumulates frames between two telemetry reports; `close` ends one and starts the next.

    n_exits counts every exit including the final head (early exits + 1), matching
    `Prediction.exit_index`; n_stages counts the bundle's stages. A detector's window
    (detector=True) has one exit bucket, the frames the model ran, and counts besides the
    frames its motion gate skipped and the tracked objects (docs/detect.md, "Agent").
    """

    def __init__(
        self,
        n_exits: int,
        n_stages: int,
        start_ts: float,
        *,
        captured_total: int = 0,
        dropped_total: int = 0,
        max_samples: int = MAX_SAMPLES,
        seed: int = 0,
        detector: bool = False,
    ) -> None:
        if n_exits < 1 or n_stages < 1:
            raise ValueError(f"need >= 1 exit and stage, got {n_exits} and {n_stages}")
        self.n_exits = n_exits
        self.n_stages = n_stages
        self.max_samples = max_samples
        self._rng = random.Random(seed)  # seeded: the same frames give the same report
        self._captured_total = captured_total
        self._dropped_total = dropped_total
        self.detector = detector
        self._reset(start_ts)

    def _reset(self, start_ts: float) -> None:
        self.start_ts = start_ts
        self.processed = 0
        self._latency = Reservoir(self.max_samples, self._rng)
        self._stages = [Reservoir(self.max_samples, self._rng) for _ in range(self.n_stages)]
        self._latency_values = self._latency.values
        self._stage_values = [r.values for r in self._stages]
        self._exits = [0] * self.n_exits
        self.skipped = 0
        self.objects_started = 0
        self._counts: dict[str, int] = {}

    def record(self, prediction_latency_ms: float, stage_ms: list[float], exit_index: int) -> None:
        """Add one processed frame: its end-to-end latency, the stages it ran, its exit.

        Runs once per frame right after inference, when the interpreter's own code and data
        are out of the caches: one range test covers NaN, infinity and negatives, and the
        reservoirs are only consulted once they are full.
        """
        if not 0 <= exit_index < self.n_exits:
            raise ValueError(f"exit_index {exit_index} outside 0..{self.n_exits - 1}")
        if len(stage_ms) > self.n_stages:
            raise ValueError(f"{len(stage_ms)} stage times for {self.n_stages} stage(s)")
        if not 0.0 <= prediction_latency_ms < math.inf:
            _check_ms(prediction_latency_ms, "latency")
        for k, ms in enumerate(stage_ms):
            if not 0.0 <= ms < math.inf:
                _check_ms(ms, f"stage {k} time")
        # Until max_samples frames no reservoir can be full (a stage sees at most every
        # frame), so values are appended without asking.
        if self.processed < self.max_samples:
            self._latency_values.append(prediction_latency_ms)
            for k, ms in enumerate(stage_ms):
                self._stage_values[k].append(ms)
            self._latency.seen += 1
            for k in range(len(stage_ms)):
                self._stages[k].seen += 1
        else:
            self._latency.add(float(prediction_latency_ms))
            for k, ms in enumerate(stage_ms):
                self._stages[k].add(float(ms))
        self._exits[exit_index] += 1
        self.processed += 1

    def record_skipped(self) -> None:
        """A frame the detector's motion gate kept from the model."""
        self.skipped += 1

    def record_objects(self, counts: dict[str, int], started: int = 0) -> None:
        """Live confirmed tracks per label after a detector frame, and tracks it confirmed.

        The window reports per label the most tracks alive at once: an object that crossed
        the view between two window ends still shows, which a count at the end would miss.
        """
        self.objects_started += started
        kept = self._counts
        for label, n in counts.items():
            if n > kept.get(label, 0):
                kept[label] = n

    def close(
        self,
        now_ts: float,
        *,
        captured: int,
        dropped: int,
        elapsed_s: float | None = None,
    ) -> WindowStats:
        """End the window at now_ts and start the next one there.

        captured and dropped are the camera's cumulative totals; the window reports what
        changed since the previous close. elapsed_s is the window's length by a monotonic
        clock, used for fps; without it now_ts - start_ts is used, which a wall-clock jump
        (NTP on a board without an RTC) would distort.
        """
        end = max(now_ts, self.start_ts)  # Telemetry requires window_end >= window_start
        span = end - self.start_ts if elapsed_s is None else elapsed_s
        fps = self.processed / span if span > 0 else 0.0
        stats = WindowStats(
            window_start=self.start_ts,
            window_end=end,
            frames_captured=_delta(captured, self._captured_total),
            frames_processed=self.processed,
            frames_dropped=_delta(dropped, self._dropped_total),
            fps=fps,
            latency_ms=percentiles(self._latency.values),
            stage_latency_ms=[percentiles(r.values) for r in self._stages],
            exit_histogram=list(self._exits),
            latency_samples=len(self._latency.values),
            frames_skipped=self.skipped if self.detector else None,
            object_counts=dict(self._counts) if self.detector else None,
            objects_started=self.objects_started if self.detector else None,
        )
        self._captured_total = captured
        self._dropped_total = dropped
        self._reset(end)
        return stats
