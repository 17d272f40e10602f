"""The governor: faster under pressure, back only after calm windows, pins, no flapping."""

from __future__ import annotations

import pytest

from edgefleet.agent.config import GovernorConfig
from edgefleet.agent.governor import Governor, Move

CFG = GovernorConfig(target_p95_ms=30.0, hot_c=80.0, recover_margin=0.7, windows_to_recover=3)
SLOW, CALM, MIDDLING = 41.2, 12.0, 25.0


def governor(n_points: int = 4, default: int = 0, cfg: GovernorConfig = CFG) -> Governor:
    return Governor(cfg, n_points, default)


def test_steps_faster_one_per_window_and_stops_at_the_fastest() -> None:
    g = governor()
    moves = [g.update(SLOW, None, None) for _ in range(5)]
    assert moves[:3] == [
        Move(0, 1, "p95 41.2 ms > target 30 ms"),
        Move(1, 2, "p95 41.2 ms > target 30 ms"),
        Move(2, 3, "p95 41.2 ms > target 30 ms"),
    ]
    assert moves[3:] == [None, None]
    assert g.current == 3


def test_recovers_one_step_after_n_calm_windows_and_not_past_the_default() -> None:
    g = governor(default=1)
    g.update(SLOW, None, None)
    g.update(SLOW, None, None)
    assert g.current == 3
    calm = [g.update(CALM, None, None) for _ in range(9)]
    assert [m is not None for m in calm] == [False, False, True] * 2 + [False] * 3
    assert calm[2] == Move(3, 2, "recovered: p95 12.0 ms < 21.0 ms for 3 windows")
    assert calm[5] == Move(2, 1, "recovered: p95 12.0 ms < 21.0 ms for 3 windows")
    assert g.current == 1  # the default; lots of headroom does not go more accurate


def test_a_middling_window_breaks_the_calm_streak() -> None:
    g = governor()
    g.update(SLOW, None, None)
    seq = [CALM, CALM, MIDDLING, CALM, CALM]
    assert all(g.update(p, None, None) is None for p in seq)
    assert g.current == 1
    assert g.update(CALM, None, None) == Move(
        1, 0, "recovered: p95 12.0 ms < 21.0 ms for 3 windows"
    )


def test_alternating_load_does_not_flap() -> None:
    g = governor()
    moves = [g.update(SLOW if i % 2 == 0 else CALM, None, None) for i in range(40)]
    done = [m for m in moves if m is not None]
    assert len(done) == 3  # straight to the fastest, never back while it keeps coming back
    assert all(m.to_index > m.from_index for m in done)


def test_two_calm_between_slow_windows_never_recover() -> None:
    g = governor(n_points=2)
    pattern = [SLOW, CALM, CALM] * 10
    moves = [m for m in (g.update(p, None, None) for p in pattern) if m is not None]
    assert moves == [Move(0, 1, "p95 41.2 ms > target 30 ms")]


def test_hot_and_throttled_push_faster_and_block_recovery() -> None:
    g = governor()
    assert g.update(CALM, 83.0, False) == Move(0, 1, "temperature 83.0 C >= 80 C")
    assert g.update(CALM, 60.0, True) == Move(1, 2, "throttled")
    assert g.update(SLOW, 80.0, True) == Move(
        2, 3, "p95 41.2 ms > target 30 ms; temperature 80.0 C >= 80 C; throttled"
    )
    for _ in range(5):
        assert g.update(CALM, 85.0, None) is None  # calm latency, still hot: stays fast
    assert g.current == 3


def test_without_target_only_heat_and_throttling_move_it() -> None:
    g = governor(cfg=GovernorConfig(target_p95_ms=None, windows_to_recover=2))
    assert g.update(1000.0, None, None) is None
    assert g.update(None, 90.0, None) == Move(0, 1, "temperature 90.0 C >= 80 C")
    assert g.update(None, 70.0, False) is None
    assert g.update(None, None, None) == Move(1, 0, "recovered: not hot or throttled for 2 windows")


def test_no_frames_is_no_evidence_of_calm_with_a_target() -> None:
    g = governor()
    g.update(SLOW, None, None)
    assert all(g.update(None, None, None) is None for _ in range(10))
    assert g.current == 1


def test_pin_holds_the_point_until_unpin() -> None:
    g = governor()
    assert g.pin(2) == Move(0, 2, "pinned to 2 by the coordinator")
    assert g.pin(2) is None
    assert all(g.update(SLOW, 95.0, True) is None for _ in range(5))
    assert g.current == 2 and g.pinned
    g.unpin()
    assert g.update(SLOW, None, None) == Move(2, 3, "p95 41.2 ms > target 30 ms")
    for _ in range(6):
        g.update(CALM, None, None)
    assert g.current == 1


def test_pin_more_accurate_than_default_stays_after_unpin_until_pressure() -> None:
    g = governor(default=2)
    g.pin(0)
    g.unpin()
    assert all(g.update(CALM, None, None) is None for _ in range(10))
    assert g.update(SLOW, None, None) == Move(0, 1, "p95 41.2 ms > target 30 ms")


def test_set_target_changes_what_counts_as_slow() -> None:
    g = governor()
    assert g.update(SLOW, None, None) is not None
    g.set_target(100.0)
    assert g.update(SLOW, None, None) is None
    g.update(SLOW, None, None)
    assert g.update(SLOW, None, None) == Move(
        1, 0, "recovered: p95 41.2 ms < 70.0 ms for 3 windows"
    )


def test_disabled_or_single_point_never_moves() -> None:
    off = governor(cfg=GovernorConfig(enabled=False, target_p95_ms=30.0))
    single = governor(n_points=1)
    for g in (off, single):
        assert all(g.update(SLOW, 99.0, True) is None for _ in range(5))
        assert g.current == 0
    assert off.pin(3) == Move(0, 3, "pinned to 3 by the coordinator")  # commands still apply


def test_setting_current_moves_without_pinning() -> None:
    g = governor()
    g.update(CALM, None, None)
    g.update(CALM, None, None)
    g.current = 2
    assert not g.pinned
    assert g.update(CALM, None, None) is None  # the calm streak restarted at the new point
    g.update(CALM, None, None)
    assert g.update(CALM, None, None) == Move(
        2, 1, "recovered: p95 12.0 ms < 21.0 ms for 3 windows"
    )


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Governor(CFG, 0, 0)
    with pytest.raises(ValueError):
        Governor(CFG, 3, 3)
    with pytest.raises(ValueError):
        governor().pin(4)
    with pytest.raises(ValueError):
        governor().set_target(0.0)
    with pytest.raises(ValueError):
        governor().current = -1
