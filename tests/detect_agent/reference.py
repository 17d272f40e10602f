"""The reference detector as a signed bundle, the reference video's truth, and the frame
each of an agent's object events happened on.

An agent replaying a file (camera.realtime = false) hands every frame to the detector, one
at a time, none dropped: the tracker sees the same frames on any machine. What differs with
machine speed is only the wall-clock time of each frame, and events carry times, not frame
numbers. Results carry both (Result.ts is the frame's capture time, Result.frame_index its
capture counter), so with `telemetry.results = "every"` they are the clock that turns an
event's times back into frames. Results are rate-limited (at most results_max_hz) and QoS 0,
so a frame may have none; its event time then maps to the frames between the two nearest
results: an interval, never a guess.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgefleet.agent.bundle import (
    ManifestBody,
    OperatingPoint,
    Provenance,
    Stage,
    TensorSpec,
    write_bundle,
)
from edgefleet.agent.bundle.manifest import Gate
from edgefleet.agent.protocol import Event, Result
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.reference.detect import (
    DET_MODEL_PATH,
    DET_VIDEO_TRUTH_PATH,
    INPUT_NAME,
    LABELS,
    deployed_spec,
    preprocessing,
)

# Both operating points of the test bundle: the detector on every frame, and behind a motion
# gate (0.5 % of the 64-pixel-wide grey frame, about 16 pixels, must move by 25 levels).
# The video's digits drift 1-2 pixels a frame: the motion test sees three of them moving at
# once as 0.03 % of the pixels (frames 345-375), under any useful threshold, so on a quiet
# stretch the gate looks only every max_skip + 1 frames. At 30 a digit moved 40 pixels,
# twice its width, between two looks and every track of frames 339-460 was lost; at 5 it
# moves 10 at most, which the tracker's prediction bridges, and half the frames still skip.
ALWAYS = OperatingPoint(name="always", thresholds=[])
GATED = OperatingPoint(name="gated", thresholds=[], gate=Gate(motion=0.005, max_skip=5))

# The agent's decode for the video test (tests/detect_agent/test_reference_video.py): a box
# must score 0.3, not the evaluation's 0.25. Between the two the retrained model reads the
# post as a "1" on dozens of frames (scores 0.25-0.34, x 112-134) and keeps a second,
# shifted box on a digit another digit crosses; at 0.3 most of those are gone, while at
# 0.35 and above digits crossing each other are lost for longer than max_missed.
SCORE_THRESHOLD = 0.3


def reference_detect_bundle(
    root: Path, score_threshold: float = SCORE_THRESHOLD
) -> tuple[Path, FleetKey]:
    """A signed one-stage detect bundle of the fp32 reference detector, and its key."""
    key, _ = init_key(root / "keys")
    data = DET_MODEL_PATH.read_bytes()
    model = onnx.load_model_from_string(data)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape: list[int | str] = [d.dim_param or d.dim_value for d in dims]
    body = ManifestBody(
        model_id="mnist-det",
        version=1,
        created_ts=time.time(),
        input=TensorSpec(name=INPUT_NAME, shape=shape),
        preprocessing=preprocessing(),
        task="detect",
        # NMS across classes: per-class NMS keeps a digit's second box of another class (a
        # "4" over a "1", IoU 0.5-0.7) frame after frame, and a box that persists min_hits
        # frames is a track: it split each digit it sat on into two (issue 17). The tracker
        # is class-agnostic and votes the class, so nothing is lost by one box per place.
        detection=deployed_spec().model_copy(update={"score_threshold": score_threshold}),
        labels=list(LABELS),
        stages=[Stage(file="model.onnx", inputs=[INPUT_NAME], outputs=[])],
        operating_points=[ALWAYS, GATED],
        provenance=Provenance(source_model_sha256=hashlib.sha256(data).hexdigest()),
    )
    out = root / "det-bundle"
    write_bundle(out, body, {"model.onnx": data}, key.private)
    return out, key


@dataclass(frozen=True)
class TruthObject:
    """One digit of the reference video: its class and the frames it is visible in."""

    track_id: int
    label: str
    first_frame: int
    last_frame: int
    hidden_frames: tuple[int, ...]

    def visible(self) -> int:
        """Frames the digit can be seen in."""
        return self.last_frame - self.first_frame + 1 - len(self.hidden_frames)


def truth_objects() -> tuple[int, list[TruthObject]]:
    """The video's frame count and its objects, from det_video_truth.json."""
    truth = json.loads(DET_VIDEO_TRUTH_PATH.read_text())
    objects = [
        TruthObject(
            int(o["track_id"]),
            LABELS[int(o["class"])],
            int(o["first_frame"]),
            int(o["last_frame"]),
            tuple(int(f) for f in o["hidden_frames"]),
        )
        for o in truth["objects"]
    ]
    return int(truth["num_frames"]), objects


Frames = tuple[int, int]  # the first and last frame (capture counter) an event may be on


class FrameClock:
    """Capture times -> capture counters, from the results an agent published."""

    def __init__(self, results: Sequence[Result]) -> None:
        pairs = sorted({(r.ts, r.frame_index) for r in results})
        self.ts = [t for t, _ in pairs]
        self.index = [i for _, i in pairs]
        if any(b <= a for a, b in zip(self.index, self.index[1:], strict=False)):
            raise AssertionError("capture times and counters disagree in order")

    def frames(self, ts: float, slack: float = 0.0) -> Frames:
        """The frames a capture time `ts` (known to +- slack seconds) may belong to.

        Exact (slack 0): the result of that very time names the frame. Otherwise the frame
        lies after the last result before ts - slack and before the first after ts + slack
        (none after: unbounded). Replayed frames are stamped when decoded, right after the
        previous one was taken, so two frames may be well under a millisecond apart: a
        rounded time may belong to a neighbour of the result it is closest to.
        """
        lo = bisect.bisect_left(self.ts, ts - slack)
        hi = bisect.bisect_right(self.ts, ts + slack)
        if slack == 0 and hi > lo:
            return self.index[lo], self.index[lo]
        before = self.index[lo - 1] + 1 if lo > 0 else 1
        after = self.index[hi] - 1 if hi < len(self.index) else 10**9
        return before, after

    def exact(self, ts: float, slack: float = 0.0) -> bool:
        """Whether a result names the frame of `ts`."""
        a, b = self.frames(ts, slack)
        return a == b


# Event durations are rounded to the millisecond (agent/runtime/objects.py), so a time made
# from start_ts + duration_s is known to half a millisecond.
DURATION_SLACK = 0.0006


@dataclass(frozen=True)
class SeenObject:
    """One track the agent reported: its class and the frames (capture counters) of its
    first sighting, its object_start (confirmation) and its object_end."""

    track_id: int
    label: str
    first_seen: Frames
    started: Frames
    ended: Frames | None  # None: no object_end yet
    frames: int | None  # frames it was matched in, from object_end


def seen_objects(events: Sequence[Event], clock: FrameClock, min_hits: int) -> list[SeenObject]:
    """The agent's object_start / object_end events, as tracks on frames.

    A track starts on the min_hits-th frame in a row it was matched in, and replayed frames
    come one after the other (a gate never skips a frame while a track is tentative), so
    its first sighting and its start are min_hits - 1 frames apart: each narrows the other.
    """
    ends = {int(e.details["track_id"]): e for e in events if e.kind == "object_end"}  # type: ignore[arg-type]
    out = []
    for e in events:
        if e.kind != "object_start":
            continue
        d = e.details
        tid = int(d["track_id"])  # type: ignore[arg-type]
        start_ts = float(d["start_ts"])  # type: ignore[arg-type]
        end = ends.get(tid)
        ended = frames = None
        if end is not None:
            ended = clock.frames(
                start_ts + float(end.details["duration_s"]),  # type: ignore[arg-type]
                DURATION_SLACK,
            )
            frames = int(end.details["frames"])  # type: ignore[arg-type]
        seen = clock.frames(start_ts)
        started = clock.frames(start_ts + float(d["duration_s"]), DURATION_SLACK)  # type: ignore[arg-type]
        lag = min_hits - 1
        started = (max(started[0], seen[0] + lag), min(started[1], seen[1] + lag))
        if started[0] > started[1]:
            raise AssertionError(f"track {tid}: start {started} not {lag} frames after {seen}")
        seen = (started[0] - lag, started[1] - lag)
        # The class is voted over the track's life: the end event carries the final one.
        label = str(d["label"] if end is None else end.details["label"])
        out.append(SeenObject(tid, label, seen, started, ended, frames))
    return out


def near(frames: Frames, target: int, tol: int) -> bool:
    """Whether an event on `frames` may be within tol frames of target."""
    return frames[0] <= target + tol and frames[1] >= target - tol


def close(a: Frames, b: Frames, tol: int) -> bool:
    """Whether two events on frames a and b may be within tol frames of each other."""
    return a[0] <= b[1] + tol and b[0] <= a[1] + tol
