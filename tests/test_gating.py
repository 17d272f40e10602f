"""The gate calibration's numerics on hand-worked clips (server/optimize/gating.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.server.optimize.gating import (
    FrameObjects,
    choose,
    found,
    gate_decisions,
    replay,
    sweep,
)


def objs(*rows: tuple[int, float, float, float, float]) -> FrameObjects:
    if not rows:
        return FrameObjects(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    a = np.array(rows, dtype=np.float64)
    return FrameObjects(a[:, 1:].astype(np.float32), a[:, 0].astype(np.int64))


def test_found_needs_same_class_and_matches_one_to_one() -> None:
    truth = objs((1, 0, 0, 10, 10), (1, 1, 0, 11, 10))
    # One seen box over two true boxes explains one of them only.
    assert found(truth, objs((1, 0, 0, 10, 10))) == 1
    assert found(truth, objs((2, 0, 0, 10, 10))) == 0
    assert found(truth, objs((1, 0, 0, 10, 10), (1, 1, 0, 11, 10))) == 2
    assert found(objs(), objs((1, 0, 0, 10, 10))) == 0


def test_decisions_follow_threshold_and_max_skip() -> None:
    moved = np.array([0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert gate_decisions(moved, None, 2).tolist() == [True] * 7
    # Frame 0 always runs, 2 has motion, and after two skips the third frame runs anyway.
    assert gate_decisions(moved, 0.1, 2).tolist() == [True, False, True, False, False, True, False]


def test_replay_keeps_the_last_run_frames_objects() -> None:
    a = objs((3, 0, 0, 10, 10))
    moved_a = objs((3, 20, 0, 30, 10))
    truth = [a, a, moved_a, moved_a]
    dets = [a, a, moved_a, moved_a]
    # Motion only at frame 3: frame 2 (object moved) is skipped and keeps frame 1's box.
    moved = np.array([0.0, 0.0, 0.0, 0.9])
    skip, recall = replay(moved, dets, truth, 0.5, 10)
    assert skip == pytest.approx(0.5)
    assert recall == pytest.approx(3 / 4)
    assert replay(moved, dets, truth, None, 10) == (0.0, 1.0)


def test_sweep_and_choose_respect_the_budget() -> None:
    a, b = objs((1, 0, 0, 10, 10)), objs((1, 50, 50, 60, 60))
    truth = [a] * 5 + [b] * 5
    moved = np.array([0, 0.01, 0.01, 0.01, 0.01, 0.2, 0.01, 0.01, 0.01, 0.01])
    figs = sweep(moved, truth, truth, max_skip=100, candidates=[0.1, 0.5])
    assert [f.motion for f in figs] == [None, 0.1, 0.5]
    assert figs[1].skip_fraction == pytest.approx(0.8) and figs[1].recall == 1.0
    # A threshold above the real motion misses the object's jump: 5 of 10 boxes lost.
    assert figs[2].recall == pytest.approx(0.5) and figs[2].recall_drop_pt == pytest.approx(50)
    assert choose(figs, 1.0).motion == 0.1
    assert choose([figs[0], figs[2]], 1.0).motion is None


def test_replay_refuses_clips_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="clip lengths differ"):
        replay(np.zeros(3), [objs()] * 2, [objs()] * 3, 0.1, 5)
