"""Energy and power from samples: counter deltas, trapezoids, per-frame energy, the meter."""

from __future__ import annotations

import pytest

from edgefleet.agent.power import (
    PowerMeter,
    PowerSample,
    counter_delta,
    energy_per_frame_mj,
    trapezoid_energy_j,
    window_power,
)


def test_counter_delta_plain_wrap_and_reset() -> None:
    assert counter_delta(100.0, 350.0, 1000.0) == 250.0
    assert counter_delta(900.0, 100.0, 1000.0) == 200.0  # wrapped at max_energy_range_uj
    assert counter_delta(900.0, 100.0, None) is None  # went back with no known range
    assert counter_delta(2000.0, 100.0, 1000.0) is None  # impossible under that range


def test_trapezoid_integrates_constant_and_ramp() -> None:
    assert trapezoid_energy_j([(float(t), 2.0) for t in range(11)]) == pytest.approx(20.0)
    # 0 W to 4 W over 2 s is a triangle of 4 J.
    assert trapezoid_energy_j([(0.0, 0.0), (1.0, 2.0), (2.0, 4.0)]) == pytest.approx(4.0)
    assert trapezoid_energy_j([(0.0, 5.0)]) == 0.0


def test_energy_per_frame_two_watts_ten_seconds_500_frames_is_40_mj() -> None:
    assert energy_per_frame_mj(2.0, 10.0, 500) == pytest.approx(40.0)
    assert energy_per_frame_mj(2.0, 10.0, 0) is None
    assert energy_per_frame_mj(None, 10.0, 500) is None
    assert energy_per_frame_mj(2.0, 0.0, 500) is None


def test_window_power_prefers_counters_and_falls_back_to_power() -> None:
    counters = [PowerSample(float(t), energy_j=2.0 * t) for t in range(11)]
    assert window_power(counters) == pytest.approx((2.0, 20.0, 10.0))
    powers = [PowerSample(float(t), power_w=2.0) for t in range(11)]
    assert window_power(powers) == pytest.approx((2.0, 20.0, 10.0))
    # A counter that went back (driver reset) is ignored in favour of the power samples.
    reset = [PowerSample(0.0, 3.0, 50.0), PowerSample(10.0, 3.0, 1.0)]
    assert window_power(reset) == pytest.approx((3.0, 30.0, 10.0))
    assert window_power([PowerSample(5.0, power_w=4.0)]) == (4.0, None, 0.0)
    assert window_power([PowerSample(5.0, error="x")]) == (None, None, 0.0)


def test_meter_from_counters_gives_40_mj_per_frame() -> None:
    meter = PowerMeter("rapl")
    for t in range(11):
        meter.add(PowerSample(1000.0 + t, energy_j=500.0 + 2.0 * t))
    window = meter.close(frames=500, window_s=10.0)
    assert window.power_w == pytest.approx(2.0)
    assert window.energy_j == pytest.approx(20.0)
    assert window.energy_per_frame_mj == pytest.approx(40.0)
    assert window.error is None


def test_meter_from_power_samples_gives_40_mj_per_frame() -> None:
    meter = PowerMeter("ina3221")
    for t in range(11):
        meter.add(PowerSample(float(t), power_w=2.0))
    window = meter.close(frames=500, window_s=10.0)
    assert window.power_w == pytest.approx(2.0)
    assert window.energy_per_frame_mj == pytest.approx(40.0)


def test_meter_windows_join_without_losing_time() -> None:
    meter = PowerMeter("hwmon")
    for t in range(6):
        meter.add(PowerSample(float(t), power_w=2.0))
    first = meter.close(frames=100, window_s=5.0)
    # Next window starts at t=5 with the carried sample: 4 W from t=6 on.
    for t in range(6, 11):
        meter.add(PowerSample(float(t), power_w=4.0))
    second = meter.close(frames=100, window_s=5.0)
    assert first.energy_j == pytest.approx(10.0)
    assert second.energy_j == pytest.approx(3.0 + 4 * 4.0)
    assert second.span_s == pytest.approx(5.0)


def test_meter_without_fresh_samples_reports_the_error() -> None:
    meter = PowerMeter("rapl")
    meter.add(PowerSample(0.0, energy_j=1.0))
    meter.add(PowerSample(1.0, energy_j=3.0))
    meter.close(frames=10, window_s=1.0)
    meter.add(PowerSample(2.0, error="/sys/x/energy_uj: gone"))
    window = meter.close(frames=10, window_s=1.0)
    assert window.power_w is None
    assert window.energy_per_frame_mj is None
    assert window.error == "/sys/x/energy_uj: gone"
