"""The telemetry window: percentiles, stages with early exits, histogram, fps, deltas, bounds."""

from __future__ import annotations

import random

import numpy as np
import pytest

from edgefleet.agent.protocol import Telemetry
from edgefleet.agent.protocol.messages import Percentiles
from edgefleet.agent.window import Reservoir, TelemetryWindow, percentiles

T0 = 1_700_000_000.0


def test_percentiles_of_known_latencies() -> None:
    w = TelemetryWindow(n_exits=1, n_stages=1, start_ts=T0)
    for ms in range(1, 101):  # 1..100 ms
        w.record(float(ms), [float(ms)], 0)
    s = w.close(T0 + 10, captured=100, dropped=0)
    assert s.latency_ms.p50 == pytest.approx(50.5)
    assert s.latency_ms.p95 == pytest.approx(95.05)
    assert s.latency_ms.p99 == pytest.approx(99.01)
    assert s.stage_latency_ms == [s.latency_ms]
    assert s.frames_processed == 100
    assert s.fps == pytest.approx(10.0)
    assert s.exit_histogram == [100]


def test_empty_window_reports_zeros() -> None:
    w = TelemetryWindow(n_exits=3, n_stages=3, start_ts=T0)
    s = w.close(T0 + 5, captured=0, dropped=0)
    zero = Percentiles(p50=0, p95=0, p99=0)
    assert s.latency_ms == zero
    assert s.stage_latency_ms == [zero, zero, zero]
    assert s.exit_histogram == [0, 0, 0]
    assert s.frames_processed == 0 and s.fps == 0.0
    assert (s.window_start, s.window_end) == (T0, T0 + 5)


def test_stage_percentiles_only_over_frames_that_ran_the_stage() -> None:
    w = TelemetryWindow(n_exits=3, n_stages=3, start_ts=T0)
    for _ in range(8):  # exit 0 after stage 0
        w.record(1.0, [1.0], 0)
    w.record(3.0, [1.0, 2.0], 1)  # exit 1 after stage 1
    w.record(13.0, [1.0, 2.0, 10.0], 2)  # final head
    s = w.close(T0 + 1, captured=10, dropped=0)
    assert s.exit_histogram == [8, 1, 1]
    assert s.stage_latency_ms[0] == Percentiles(p50=1.0, p95=1.0, p99=1.0)
    assert s.stage_latency_ms[1] == Percentiles(p50=2.0, p95=2.0, p99=2.0)
    assert s.stage_latency_ms[2] == Percentiles(p50=10.0, p95=10.0, p99=10.0)
    assert s.latency_ms.p50 == 1.0 and s.latency_ms.p99 > s.latency_ms.p95 > 1.0


def test_fps_uses_elapsed_when_given_and_survives_clock_going_back() -> None:
    w = TelemetryWindow(n_exits=1, n_stages=1, start_ts=T0)
    for _ in range(30):
        w.record(1.0, [1.0], 0)
    # The wall clock jumped an hour ahead (NTP sync); the monotonic length was 3 s.
    s = w.close(T0 + 3600, captured=30, dropped=0, elapsed_s=3.0)
    assert s.fps == pytest.approx(10.0)
    w.record(1.0, [1.0], 0)
    back = w.close(T0, captured=31, dropped=0)  # wall clock stepped back
    assert back.window_end == back.window_start == T0 + 3600
    assert back.fps == 0.0


def test_captured_and_dropped_are_per_window_deltas() -> None:
    w = TelemetryWindow(n_exits=1, n_stages=1, start_ts=T0, captured_total=5, dropped_total=1)
    first = w.close(T0 + 10, captured=105, dropped=11)
    second = w.close(T0 + 20, captured=250, dropped=11)
    assert (first.frames_captured, first.frames_dropped) == (100, 10)
    assert (second.frames_captured, second.frames_dropped) == (145, 0)
    assert second.window_start == first.window_end == T0 + 10
    # A recreated camera starts counting from zero again: its total is all new.
    third = w.close(T0 + 30, captured=7, dropped=2)
    assert (third.frames_captured, third.frames_dropped) == (7, 2)


def test_close_starts_a_fresh_window() -> None:
    w = TelemetryWindow(n_exits=2, n_stages=2, start_ts=T0)
    w.record(50.0, [20.0, 30.0], 1)
    w.close(T0 + 1, captured=1, dropped=0)
    w.record(2.0, [2.0], 0)
    s = w.close(T0 + 2, captured=2, dropped=0)
    assert s.exit_histogram == [1, 0]
    assert s.latency_ms.p99 == 2.0
    assert s.stage_latency_ms[1] == Percentiles(p50=0, p95=0, p99=0)


def test_samples_are_bounded_and_still_representative() -> None:
    w = TelemetryWindow(n_exits=1, n_stages=1, start_ts=T0, max_samples=1000)
    values = np.random.default_rng(1).uniform(0, 100, size=50_000)
    for ms in values:
        w.record(float(ms), [float(ms)], 0)
    s = w.close(T0 + 100, captured=50_000, dropped=0)
    assert s.latency_samples == 1000
    assert len(w._latency.values) == 0 and w._latency.size == 1000
    assert s.frames_processed == 50_000 and s.exit_histogram == [50_000]
    # A uniform sample of the whole window, not just its end: close to the true quantiles.
    assert s.latency_ms.p50 == pytest.approx(50, abs=5)
    assert s.latency_ms.p95 == pytest.approx(95, abs=3)


def test_window_keeps_exactly_what_plain_reservoirs_keep() -> None:
    """record's fill-up shortcut changes no sample: same values as Reservoir.add alone."""
    w = TelemetryWindow(n_exits=2, n_stages=2, start_ts=T0, max_samples=50, seed=5)
    rng = random.Random(5)
    latency, stage0, stage1 = (Reservoir(50, rng) for _ in range(3))
    values = np.random.default_rng(3).uniform(0, 10, size=(400, 3)).tolist()
    for i, (total, a, b) in enumerate(values):
        stages = [a, b] if i % 3 else [a]  # every third frame exits after stage 0
        w.record(total, stages, len(stages) - 1)
        latency.add(total)
        stage0.add(a)
        if len(stages) == 2:
            stage1.add(b)
    assert w._latency.values == latency.values
    assert [r.values for r in w._stages] == [stage0.values, stage1.values]
    assert [r.seen for r in w._stages] == [400, 266]


def test_percentiles_stay_ordered_on_equal_samples() -> None:
    p = percentiles([0.1] * 7 + [0.1 + 1e-17] * 3)
    assert p.p50 <= p.p95 <= p.p99


@pytest.mark.parametrize(
    ("latency", "stages", "exit_index"),
    [(1.0, [1.0], 2), (1.0, [1.0], -1), (float("nan"), [1.0], 0), (1.0, [-1.0], 0),
     (float("inf"), [1.0], 0), (1.0, [float("nan")], 0), (1.0, [1.0, 1.0, 1.0], 0)],
)  # fmt: skip
def test_bad_records_are_refused(latency: float, stages: list[float], exit_index: int) -> None:
    w = TelemetryWindow(n_exits=2, n_stages=2, start_ts=T0)
    with pytest.raises(ValueError):
        w.record(latency, stages, exit_index)


def test_stats_build_a_valid_telemetry() -> None:
    w = TelemetryWindow(n_exits=2, n_stages=2, start_ts=T0)
    w.record(4.0, [1.5, 2.5], 1)
    s = w.close(T0 + 10, captured=3, dropped=2)
    t = Telemetry(
        **s.telemetry_fields(),
        device_id="pi-1",
        seq=0,
        operating_point=0,
        cpu_percent=10.0,
        rss_mb=50.0,
        power_source="none",
        outbox_depth=0,
        outbox_overflow=0,
    )
    assert t.frames_captured == 3 and t.exit_histogram == [0, 1]
    assert t.stage_latency_ms[1].p50 == 2.5
