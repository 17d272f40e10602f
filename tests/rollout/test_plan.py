"""Canary, wave and duration options, and the rollout plan they make."""

from __future__ import annotations

import pytest

from edgefleet.server.rollout.plan import (
    Canary,
    PlanError,
    parse_canary,
    parse_duration,
    parse_waves,
    plan,
)

DEVICES = [f"pi-{i:02d}" for i in range(20)]


def test_parse_canary() -> None:
    assert parse_canary("10%") == Canary(fraction=0.1)
    assert parse_canary("3") == Canary(count=3)
    assert parse_canary("10%").size(3) == 1  # rounds up: never 0 canaries
    assert parse_canary("5").size(2) == 2
    assert parse_canary("100%").size(7) == 7
    bad_ones = [("0%", "above 0%"), ("0", "at least 1"), ("ten", "expected"), ("150%", "at most")]
    for bad, says in bad_ones:
        with pytest.raises(PlanError, match=says):
            parse_canary(bad)


def test_parse_waves() -> None:
    assert parse_waves("10%,50%,100%") == [0.1, 0.5, 1.0]
    assert parse_waves("100%") == [1.0]
    with pytest.raises(PlanError, match=r"part 2 '50' is not a percentage"):
        parse_waves("10%,50,100%")
    with pytest.raises(PlanError, match=r"part 3 '40%' does not increase on 50%"):
        parse_waves("10%,50%,40%,100%")
    with pytest.raises(PlanError, match=r"last wave must be 100%, got '50%'"):
        parse_waves("10%,50%")
    with pytest.raises(PlanError, match=r"part 1 ''"):
        parse_waves(",100%")


def test_parse_duration() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1h2m3s") == 3723
    assert parse_duration("1.5m") == 90
    for bad in ["", "5", "5x", "m5", "30m1h", "5m5m", "5y"]:
        with pytest.raises(PlanError, match="duration"):
            parse_duration(bad)


def test_plan_covers_every_device_once_in_cumulative_waves() -> None:
    waves = plan(DEVICES, parse_canary("10%"), [0.25, 0.5, 1.0], seed="r1")
    assert [len(w) for w in waves] == [2, 3, 5, 10]
    flat = [d for w in waves for d in w]
    assert sorted(flat) == DEVICES and len(flat) == len(set(flat))


def test_plan_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a = plan(DEVICES, Canary(count=3), [0.5, 1.0], seed="r1")
    assert plan(list(reversed(DEVICES)), Canary(count=3), [0.5, 1.0], seed="r1") == a
    others = [plan(DEVICES, Canary(count=3), [0.5, 1.0], seed=f"r{i}")[0] for i in range(2, 6)]
    assert any(o != a[0] for o in others)


def test_plan_prefers_online_devices_as_canaries() -> None:
    online = {"pi-07", "pi-13"}
    waves = plan(DEVICES, Canary(count=3), [1.0], seed="r1", online=online)
    assert online <= set(waves[0]) and len(waves[0]) == 3
    # Only one online device but 1 canary wanted: it is that one, whatever the seed.
    for seed in ["a", "b", "c"]:
        assert plan(DEVICES, Canary(count=1), [1.0], seed, online={"pi-19"})[0] == ["pi-19"]


def test_plan_drops_empty_waves_and_handles_tiny_groups() -> None:
    # The canaries already cover 10%: that wave is empty and dropped.
    assert [len(w) for w in plan(DEVICES, Canary(fraction=0.1), [0.1, 1.0], "s")] == [2, 18]
    assert plan(["only"], parse_canary("10%"), [0.1, 0.5, 1.0], "s") == [["only"]]
    assert plan([], parse_canary("10%"), [1.0], "s") == []
    twice = plan(["a", "a", "b"], Canary(count=1), [1.0], "s")
    assert sorted(d for w in twice for d in w) == ["a", "b"]
    with pytest.raises(PlanError):
        plan(DEVICES, Canary(count=1), [0.5, 0.9], "s")
