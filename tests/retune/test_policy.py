"""The closed loop's decision for one device: rules, hysteresis, blocking (pure)."""

from __future__ import annotations

import pytest

from edgefleet.server.retune.latency import Config, Prediction
from edgefleet.server.retune.policy import (
    Candidate,
    Choice,
    DeviceState,
    LoopSettings,
    NoChoice,
    decide,
)

S = LoopSettings(miss_windows=3, under_windows=6, headroom=0.85, far_under=0.5)
ACC, MID, FAST = Config("a" * 64, 0), Config("a" * 64, 2), Config("b" * 64, 0)
CANDS = [
    Candidate("m-v1", ACC, "accurate", 0.99),
    Candidate("m-v1", MID, "balanced", 0.98),
    Candidate("m-v2", FAST, "fast", 0.95),
]
PRED = {
    ACC: Prediction(30.0, "measured", ""),
    MID: Prediction(20.0, "measured", ""),
    FAST: Prediction(10.0, "class_ratio", ""),
}


def dev(config: Config = ACC, miss: int = 0, under: int = 0, factor: float = 1.0,
        p95: float | None = 30.0, blocked: dict[Config, float] | None = None) -> DeviceState:
    return DeviceState("d1", "rpi5", config, p95, miss, under, factor, blocked or {})


def test_no_streak_no_move() -> None:
    assert decide(dev(miss=2), CANDS, PRED, 25.0, None, S) is None


def test_miss_goes_to_the_most_accurate_candidate_under_headroom() -> None:
    c = decide(dev(miss=3), CANDS, PRED, 25.0, None, S)
    assert isinstance(c, Choice) and c.candidate.config == MID and c.meets_target
    # 20 ms is over 0.85 x 22: only the fast variant fits.
    c = decide(dev(miss=3), CANDS, PRED, 22.0, None, S)
    assert isinstance(c, Choice) and c.candidate.config == FAST


def test_accuracy_floor_excludes_candidates() -> None:
    c = decide(dev(miss=3), CANDS, PRED, 22.0, 0.97, S)
    assert isinstance(c, NoChoice) or (isinstance(c, Choice) and not c.meets_target)
    assert not (isinstance(c, Choice) and c.candidate.config == FAST)


def test_a_slow_device_scales_the_class_figures() -> None:
    # This device runs 2x its class: balanced would be 40 ms on it; only fast (20) fits 25.
    c = decide(dev(miss=3, factor=2.0, p95=60.0), CANDS, PRED, 25.0, None, S)
    assert isinstance(c, Choice) and c.candidate.config == FAST
    assert c.predicted_ms == pytest.approx(20.0)


def test_nothing_fits_takes_the_fastest_when_clearly_faster() -> None:
    c = decide(dev(miss=3, factor=3.0, p95=90.0), CANDS, PRED, 20.0, None, S)
    assert isinstance(c, Choice) and c.candidate.config == FAST and not c.meets_target
    # Already on the fastest: nothing to go to.
    n = decide(dev(FAST, miss=3, factor=3.0, p95=30.0), CANDS, PRED, 20.0, None, S)
    assert isinstance(n, NoChoice) and "no candidate" in n.reason


def test_far_under_moves_back_toward_accuracy_only_with_a_gain() -> None:
    c = decide(dev(FAST, under=6, p95=10.0), CANDS, PRED, 40.0, None, S)
    assert isinstance(c, Choice) and c.trigger == "far_under" and c.candidate.config == ACC
    # Under 0.85 x 25 only balanced fits, which is more accurate than fast: go there.
    c = decide(dev(FAST, under=6, p95=10.0), CANDS, PRED, 25.0, None, S)
    assert isinstance(c, Choice) and c.candidate.config == MID
    # Already on the most accurate: stay.
    assert decide(dev(ACC, under=6, p95=10.0), CANDS, PRED, 100.0, None, S) is None


def test_blocked_configuration_until_the_device_is_much_faster() -> None:
    blocked = {MID: 2.0}  # it left balanced when it ran 2x its class
    d = dev(FAST, under=6, p95=10.0, factor=1.8, blocked=blocked)
    c = decide(d, CANDS, PRED, 25.0, None, S)
    assert c is None  # balanced is blocked, accurate does not fit
    d = dev(FAST, under=6, p95=10.0, factor=1.0, blocked=blocked)
    c = decide(d, CANDS, PRED, 25.0, None, S)
    assert isinstance(c, Choice) and c.candidate.config == MID


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="far_under"):
        LoopSettings(far_under=0.9, headroom=0.85)
    with pytest.raises(ValueError, match="miss_windows"):
        LoopSettings(miss_windows=0)
