"""The motion gate on synthetic frames: still scenes skip, motion runs, limits hold."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.agent.bundle.manifest import Gate
from edgefleet.agent.detect.gate import MotionGate

H, W = 120, 160


def _scene(seed: int = 0) -> npt.NDArray[np.uint8]:
    """A textured still background (smooth enough to survive the blur)."""
    rng = np.random.default_rng(seed)
    small: npt.NDArray[np.uint8] = rng.integers(40, 200, (12, 16, 3), dtype=np.uint8)
    scene: npt.NDArray[np.uint8] = small.repeat(10, axis=0).repeat(10, axis=1)
    return scene


def _with_square(x: int, y: int = 40, size: int = 40) -> npt.NDArray[np.uint8]:
    frame: npt.NDArray[np.uint8] = _scene().copy()
    frame[y : y + size, x : x + size] = 255
    return frame


def _gate(**kw: Any) -> MotionGate:
    return MotionGate(Gate.model_validate({"motion": 0.02, "max_skip": 1000, **kw}))


def test_still_scene_runs_once_then_skips() -> None:
    gate = _gate()
    decisions = [gate.should_run(_scene()) for _ in range(11)]
    assert decisions == [True] + [False] * 10
    assert (gate.frames, gate.ran, gate.skipped) == (11, 1, 10)
    assert gate.moved_fraction == 0.0
    assert gate.skip_fraction() == pytest.approx(10 / 11)


def test_moving_square_runs_every_frame() -> None:
    gate = _gate()
    assert gate.should_run(_scene())
    assert gate.should_run(_scene()) is False
    runs = [gate.should_run(_with_square(x)) for x in range(0, 120, 10)]
    assert all(runs), runs
    assert gate.moved_fraction is not None and gate.moved_fraction >= 0.02


def test_motion_below_the_fraction_skips() -> None:
    gate = _gate(motion=0.5)  # the square covers far less than half the frame
    assert gate.should_run(_scene())
    assert not any(gate.should_run(_with_square(x)) for x in range(0, 120, 10))
    assert gate.moved_fraction is not None and 0.0 < gate.moved_fraction < 0.5


def test_pixel_threshold_and_adapting_background() -> None:
    gate = _gate(pixel_threshold=25)
    base = _scene()
    gate.should_run(base)
    assert not gate.should_run(base + 20)  # a 20-level change everywhere is no motion
    gate = _gate(pixel_threshold=25)
    gate.should_run(base)
    # +40 everywhere (a light switched on) runs; the average then learns the new light
    # (40 * .8^k <= 25 from k = 3 on) and the still scene skips again.
    runs = [gate.should_run(base + 40) for _ in range(6)]
    assert runs[:3] == [True, True, True] and runs[3:] == [False, False, False]


@pytest.mark.parametrize("max_skip", [0, 1, 3])
def test_max_skip_runs_a_still_scene_regularly(max_skip: int) -> None:
    gate = _gate(max_skip=max_skip)
    decisions = [gate.should_run(_scene()) for _ in range(1 + 3 * (max_skip + 1))]
    expected = [True] + ([False] * max_skip + [True]) * 3
    assert decisions == expected


def test_no_motion_threshold_always_runs() -> None:
    gate = MotionGate(Gate())
    assert all(gate.should_run(_scene()) for _ in range(5))
    assert (gate.ran, gate.skipped, gate.moved_fraction) == (5, 0, None)


def test_new_frame_size_runs_and_restarts_the_average() -> None:
    gate = _gate()
    gate.should_run(_scene())
    assert not gate.should_run(_scene())
    assert gate.should_run(_scene()[:60])
    assert not gate.should_run(_scene()[:60])


def test_grey_and_bgra_frames_and_bad_frames() -> None:
    grey = _scene()[:, :, 1].copy()
    gate = _gate()
    assert [gate.should_run(grey) for _ in range(2)] == [True, False]
    bgra = np.dstack([_scene(), np.full((H, W), 255, np.uint8)])
    gate = _gate()
    assert [gate.should_run(bgra) for _ in range(2)] == [True, False]
    with pytest.raises(ValueError, match="uint8"):
        gate.should_run(_scene().astype(np.float32))
    assert gate.frames == 2


def test_forced_frames_run_and_still_join_the_background() -> None:
    gate = _gate()
    gate.should_run(_scene())
    assert gate.should_run(_scene(), force=True) is True
    assert gate.moved_fraction == 0.0 and gate.skipped_in_a_row == 0
    # The forced frame counted as run, so skipping resumes from zero.
    assert [gate.should_run(_scene()) for _ in range(3)] == [False] * 3
    assert (gate.ran, gate.skipped) == (2, 3)
