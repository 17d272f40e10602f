"""The detect pipeline with a motion gate: still frames skip the model, yet objects start and end
on time, because frames the tracker still has to decide on are never skipped."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.bundle.manifest import Gate
from edgefleet.agent.config import DetectConfig, TrackerConfig
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.runtime.objects import DetectPipeline
from edgefleet.agent.runtime.preprocess import Preprocessor
from tests.detect_agent.helpers import detect_bundle, frame_with_square

EMPTY, SQUARE, AFTER = 20, 60, 60


Frames = list[tuple[int, str, int, int, int | None]]  # i, kind, frame, first, last


def run(tmp_path: Path, gate: Gate | None) -> tuple[list[tuple[int, str]], int, Frames]:
    bundle, key = detect_bundle(tmp_path)
    model = DetectorModel(verify_bundle(bundle, [key.public]))
    pre = Preprocessor(model.manifest.preprocessing)
    cfg = DetectConfig(tracker=TrackerConfig(min_hits=3, max_missed=20))
    pipe = DetectPipeline(model, cfg, gate)
    cells = [None] * EMPTY + [(1, 2)] * SQUARE + [None] * AFTER
    events: list[tuple[int, str]] = []
    frames: Frames = []
    ran = 0
    for i, cell in enumerate(cells):
        # the camera counter: a number of its own, not the loop's index
        step = pipe.step(frame_with_square(cell), i / 30.0, pre, 1000 + i)
        ran += step.ran
        events += [(i, e.kind) for e in step.events]
        frames += [
            (i, e.kind, *(e.details.get(k) for k in ("frame", "first_frame", "last_frame")))  # type: ignore[misc]
            for e in step.events
        ]
    return events, ran, frames


def test_gate_skips_still_frames_and_keeps_event_times(tmp_path: Path) -> None:
    ungated, ran_all, frames = run(tmp_path / "a", None)
    gated, ran_gated, gated_frames = run(tmp_path / "b", Gate(motion=0.01, max_skip=1000))
    assert ran_all == EMPTY + SQUARE + AFTER
    # Start confirmed on the 3rd frame with the square, end on the 20th without it, either way.
    assert ungated == [(EMPTY + 2, "object_start"), (EMPTY + SQUARE + 19, "object_end")]
    assert gated == ungated
    # The events name the camera frames that made them, the track's first and last.
    first, last = 1000 + EMPTY, 1000 + EMPTY + SQUARE - 1
    assert frames == [
        (EMPTY + 2, "object_start", first + 2, first, None),
        (EMPTY + SQUARE + 19, "object_end", last + 20, first, last),
    ]
    # Gated, the end's last_frame is the last frame the model ran and matched it: the still
    # square's frames were skipped, so it is earlier; everything else is the same.
    (end_gated,) = [f for f in gated_frames if f[1] == "object_end"]
    assert gated_frames == [frames[0], (*frames[1][:4], end_gated[4])]
    assert end_gated[4] is not None and first + 2 <= end_gated[4] < last
    # Appearing and leaving run a few frames each; the still ones in between are skipped.
    assert ran_gated < 0.25 * ran_all
