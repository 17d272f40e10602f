"""The reference detection video's truth, the clock that turns an agent's event times into
its frames, and the judge of object events against the truth: pure, tested alone
(tests/test_demo_detector.py), used by the demo's detector part (detector.py).

A looped file plays at its frame rate; an agent's results carry a frame's capture time and
the camera's frame counter (which counts from 1 and goes on across loops), so an event's
time maps to a counter, and a counter to a frame of the video.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.server.reference.detect import DET_VIDEO_TRUTH_PATH

# An event's first sighting may be this many frames from the truth's first frame (half a
# second at 30 fps). The truth starts an object on the first frame with half its ink in
# view; the detector may fire on a little less or a little more of a digit that slides in
# from the edge at 0.5-3 px a frame (measured: -3 to +5 frames), and a busy 2-core machine
# drops camera frames, so the first frame the detector runs on with the digit in view may
# come a few frames later.
START_TOLERANCE = 15
MIN_SECONDS = 1.0  # truth objects in view for less are not required to start an event


@dataclass(frozen=True)
class TruthObject:
    """One digit of the reference video: its label and the frames it is in view."""

    track_id: int
    label: str
    first_frame: int
    last_frame: int


@dataclass(frozen=True)
class VideoTruth:
    """The reference video's objects, length and frame rate."""

    frames: int
    fps: float
    objects: tuple[TruthObject, ...]

    @classmethod
    def load(cls, path: Path = DET_VIDEO_TRUTH_PATH) -> VideoTruth:
        """Read det_video_truth.json."""
        doc = json.loads(path.read_text())
        labels = doc["labels"]
        objects = tuple(
            TruthObject(
                int(o["track_id"]),
                labels[int(o["class"])],
                int(o["first_frame"]),
                int(o["last_frame"]),
            )
            for o in doc["objects"]
        )
        return cls(int(doc["num_frames"]), float(doc["fps"]), objects)

    def long_objects(self, seconds: float = MIN_SECONDS) -> list[TruthObject]:
        """Objects in view for more than `seconds`."""
        return [o for o in self.objects if (o.last_frame - o.first_frame + 1) / self.fps > seconds]


Anchor = tuple[float, int]  # a result's (frame capture time, camera frame counter)


def camera_frame(ts: float, anchors: Sequence[Anchor], fps: float) -> int:
    """The camera's frame counter at capture time ts, from the nearest anchor.

    A looped file plays at its frame rate, so between two results the counter advances
    fps per second; an event's time is some frame's capture time, usually one a result
    carries too, which makes this exact.
    """
    if not anchors:
        raise ValueError("no results to map times to frames")
    i = bisect.bisect_left(anchors, (ts, -1))
    near = min(anchors[max(0, i - 1) : i + 1], key=lambda a: abs(a[0] - ts))
    return near[1] + round((ts - near[0]) * fps)


def video_frame(counter: int, frames: int) -> int:
    """The video frame a camera counter shows: the counter starts at 1, the file loops."""
    return (counter - 1) % frames


@dataclass(frozen=True)
class Sighting:
    """An object_start event: its track, label and the camera counter of its first sighting."""

    track_id: int
    label: str
    counter: int


@dataclass
class Judgement:
    """Truth objects against the detector's object_start events, over the frames it ran."""

    judged: int = 0  # truth objects (> MIN_SECONDS) whose start fell in the run's frames
    offsets: list[int] = field(default_factory=list)  # event counter - truth counter, matched
    missed: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)  # events of a class not in view then
    events: int = 0  # object_start events in the run's frames

    @property
    def ok(self) -> bool:
        """At least one object judged, and each found.

        Strays are counted, not failed: the reference detector (test mAP@0.5 about 0.7)
        flickers between classes on digits that slide in or overlap, and the tracker is per
        class, so each flicker that holds min_hits frames is a short extra track.
        """
        return self.judged > 0 and not self.missed


def judge(
    truth: VideoTruth,
    sightings: Sequence[Sighting],
    first: int,
    last: int,
    tolerance: int = START_TOLERANCE,
) -> Judgement:
    """Match each truth object in view > 1 s, in every pass within camera counters
    [first + tolerance, last - tolerance], to one object_start of its class within tolerance
    frames of its first frame; and each object_start in [first, last] to an object of its
    class in view then (an object that comes back after an occlusion starts a new track)."""
    out = Judgement()
    n = truth.frames
    used: set[int] = set()
    for p in range(max(0, (first - 1) // n), (last - 1) // n + 1):
        for o in truth.long_objects():
            at = p * n + o.first_frame + 1  # the counter showing its first frame
            if at - tolerance < first or at + tolerance > last:
                continue
            out.judged += 1
            near = [
                (abs(s.counter - at), k)
                for k, s in enumerate(sightings)
                if k not in used and s.label == o.label and abs(s.counter - at) <= tolerance
            ]
            if not near:
                out.missed.append(f"digit {o.label} (#{o.track_id}) of frame {o.first_frame}")
                continue
            k = min(near)[1]
            used.add(k)
            out.offsets.append(sightings[k].counter - at)
    for s in sightings:
        if not first <= s.counter <= last:
            continue
        out.events += 1
        v = video_frame(s.counter, n)
        if not any(
            o.label == s.label and o.first_frame - tolerance <= v <= o.last_frame
            for o in truth.objects
        ):
            out.strays.append(f"{s.label} #{s.track_id} at frame {v}")
    return out


def pass_end(first: int, truth: VideoTruth, tolerance: int = START_TOLERANCE) -> int:
    """The counter by which one whole pass has played since the detector's first frame."""
    n = truth.frames
    earliest = min(o.first_frame for o in truth.long_objects()) + 1
    p = max(0, -(-(first + tolerance - earliest) // n))  # the first pass it sees begin
    return (p + 1) * n
