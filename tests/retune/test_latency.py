"""Latency measurement and prediction per device class (pure numerics)."""

from __future__ import annotations

import pytest

from edgefleet.server.retune.latency import (
    Config,
    RunningP95,
    class_figure,
    cost,
    family,
    predict,
    prediction_error,
    speed_ratio,
)

A0, A1, B0 = Config("a" * 64, 0), Config("a" * 64, 1), Config("b" * 64, 0)
COSTS = {A0: 2.0, A1: 1.0, B0: 4.0}


def test_running_p95_is_the_mean_first_then_follows_a_change() -> None:
    est = RunningP95()
    for v in (10.0, 20.0, 30.0):
        est.add(v)
    assert est.value == pytest.approx(20.0)
    for _ in range(30):
        est.add(100.0)
    assert est.value == pytest.approx(100.0, rel=0.01)


def test_class_figure_is_the_median_so_one_slow_device_does_not_move_it() -> None:
    assert class_figure([10.0, 11.0, 12.0, 95.0]) == pytest.approx(11.5)
    assert class_figure([]) is None


def test_cost_scales_no_exit_latency_by_the_expected_share_of_macs() -> None:
    assert cost(0.2, 25.0, 100.0) == pytest.approx(0.05)
    assert cost(0.2, 25.0, 0.0) == pytest.approx(0.2)


def test_family() -> None:
    assert family("rpi5") == family("rpi4") == "rpi"
    assert family("jetson-orin-nano") == "jetson"
    assert family("x86-avx512") == family("x86") == "x86"


def test_measured_wins() -> None:
    p = predict(A0, "rpi5", {"rpi5": {A0: 7.0}}, COSTS)
    assert p is not None and p.basis == "measured" and p.p95_ms == 7.0


def test_other_configuration_of_the_same_class_sets_the_scale() -> None:
    # A0 costs 2 ms and runs in 10 ms on rpi5: B0 (cost 4) is predicted at 20 ms there.
    p = predict(B0, "rpi5", {"rpi5": {A0: 10.0}}, COSTS)
    assert p is not None and p.basis == "class_ratio"
    assert p.p95_ms == pytest.approx(20.0)
    assert speed_ratio({A0: 10.0, A1: 6.0}, COSTS) == pytest.approx(5.5)


def test_a_class_with_nothing_measured_takes_the_nearest_class_ratio() -> None:
    measured = {"rpi4": {A0: 20.0}, "x86-avx512": {A0: 1.0}}
    p = predict(B0, "rpi5", measured, COSTS)
    assert p is not None and p.basis == "nearest_class" and "rpi4" in p.detail
    assert p.p95_ms == pytest.approx(40.0)
    # No relative: the median ratio of the fleet; nothing measured: the optimizer's own.
    q = predict(B0, "jetson-orin-nano", measured, COSTS)
    assert q is not None and q.basis == "fleet_ratio"
    assert q.p95_ms == pytest.approx(4.0 * (10.0 + 0.5) / 2)
    r = predict(B0, "rpi5", {}, COSTS)
    assert r is not None and r.basis == "optimizer" and r.p95_ms == 4.0


def test_unknown_configuration_without_cost_has_no_prediction() -> None:
    assert predict(Config("c" * 64, 0), "rpi5", {"rpi5": {A0: 1.0}}, COSTS) is None


def test_prediction_error_is_signed() -> None:
    assert prediction_error(10.0, 12.5) == pytest.approx(0.25)
    assert prediction_error(10.0, 8.0) == pytest.approx(-0.2)
