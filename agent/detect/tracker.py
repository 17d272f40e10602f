"""Per-frame boxes -> tracks with start / update / end events (a small IoU tracker).

A detection continues the track whose box (last, or moved on by the track's velocity)
overlaps it most, greedily by IoU; no appearance model, no Kalman filter: on a Pi, the
detector is the expensive part and objects move little between frames.

Class-agnostic (the default): any class continues a track, and the track's class is the one
with the most accumulated detection score (votes), so a detector that reads an 8 as a 3 for
a few frames while it slides in or overlaps another neither starts nor splits a track (on
the reference video, per-class matching made ~57 starts of 8 digits). With
`class_agnostic=False` a detection continues only a track of its own class. A track
is confirmed, and "start" is sent, after `min_hits` consecutive matched frames, so a
detector's one-frame false positive is no event (DeepSORT's tentative tracks). A confirmed
track survives `max_missed` - 1 frames without a match (occlusion, a missed detection) and
ends at the `max_missed`-th, or once `max_missed_s` seconds passed since it was last seen.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from .boxes import Detections, iou_matrix

EventKind = Literal["start", "update", "end"]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TrackEvent:
    """What happened to a track, with the track as it is now.

    ts is the time of the frame (or flush) that produced the event; last_ts the last frame
    the object was matched in (earlier than ts for "end"), so last_ts - start_ts is how long
    it was seen. frame, first_frame and last_frame are the same three as frame numbers (the
    caller's, e.g. the camera counter). class_index is the class voted so far: a start
    carries the class at confirmation, an end the final one.
    """

    kind: EventKind
    track_id: int
    class_index: int
    score: float  # best so far
    box: Box  # last matched, xyxy frame pixels
    start_ts: float
    ts: float
    last_ts: float
    frames: int  # frames the object was matched in
    frame: int  # the frame that produced the event (the last one seen, for a flush)
    first_frame: int  # the frame the track was first matched in
    last_frame: int  # the frame the track was last matched in


@dataclass
class Track:
    """One object followed over frames."""

    track_id: int
    class_index: int
    box: Box
    score: float  # best so far
    start_ts: float
    last_ts: float
    frames: int = 1
    missed: int = 0  # consecutive frames without a match
    confirmed: bool = False
    # Box edges, pixels per frame: frame numbers, not times, because a replayed file's frames
    # are stamped when decoded, as irregularly as the detector keeps up (a fraction of a
    # millisecond or tens of them apart), so a velocity per second jumps with machine
    # speed and carries predictions off (issue 17); camera frames are evenly spaced.
    velocity: Box = (0.0, 0.0, 0.0, 0.0)
    first_frame: int = 0
    last_frame: int = 0
    votes: dict[int, float] = field(default_factory=dict)  # class -> summed detection score
    reported_class: int = field(default=-1, repr=False)
    reported_box: Box = field(default=(0.0, 0.0, 0.0, 0.0), repr=False)
    reported_score: float = field(default=0.0, repr=False)
    reported_ts: float = field(default=0.0, repr=False)

    def predicted(self, frame: int) -> Box:
        """The box moved on by the velocity to frame number `frame`."""
        return _comb(self.box, self.velocity, 1.0, float(frame - self.last_frame))

    def vote(self, cls: int, score: float) -> None:
        """Add a detection's score to its class; the track takes the class with the most.

        A tie keeps the class the track has, so a track does not change class back and
        forth on equal evidence."""
        self.votes[cls] = self.votes.get(cls, 0.0) + score
        best = max(self.votes.values())
        if self.votes.get(self.class_index, 0.0) < best:
            self.class_index = max(self.votes, key=lambda c: (self.votes[c], -c))

    def event(self, kind: EventKind, ts: float, frame: int) -> TrackEvent:
        """This track as an event of `kind` at `ts`, produced by `frame`."""
        return TrackEvent(
            kind,
            self.track_id,
            self.class_index,
            self.score,
            self.box,
            self.start_ts,
            ts,
            self.last_ts,
            self.frames,
            frame,
            self.first_frame,
            self.last_frame,
        )


class IouTracker:
    """Tracks by greedy IoU matching, across classes or per class; `update` once per run."""

    def __init__(
        self,
        iou: float = 0.3,
        max_missed: int = 15,
        min_hits: int = 3,
        *,
        max_missed_s: float | None = None,
        update_interval_s: float = 1.0,
        move_iou: float = 0.7,
        class_agnostic: bool = True,
        duplicate_iou: float = 0.7,
    ) -> None:
        """iou: least overlap that continues a track. update_interval_s: least time between
        two "update" events of a track, sent only when its box moved (IoU with the last
        reported box below move_iou), its best score rose or its voted class changed.
        class_agnostic: match across classes, the class by votes (else per class).
        duplicate_iou: class-agnostic only: a detection that overlaps one already taken
        this frame at least this much is the same object read as another class (per-class
        NMS keeps both) and only votes; it starts no track."""
        if not 0.0 < iou <= 1.0 or not 0.0 < move_iou <= 1.0 or not 0.0 < duplicate_iou <= 1.0:
            raise ValueError(
                f"iou {iou}, move_iou {move_iou} and duplicate_iou {duplicate_iou} "
                "must be in (0, 1]"
            )
        if max_missed < 1 or min_hits < 1:
            raise ValueError(f"max_missed {max_missed} and min_hits {min_hits} must be >= 1")
        if max_missed_s is not None and max_missed_s <= 0:
            raise ValueError(f"max_missed_s {max_missed_s} must be > 0")
        if update_interval_s < 0:
            raise ValueError(f"update_interval_s {update_interval_s} must be >= 0")
        self.iou = iou
        self.max_missed = max_missed
        self.min_hits = min_hits
        self.max_missed_s = max_missed_s
        self.update_interval_s = update_interval_s
        self.move_iou = move_iou
        self.class_agnostic = class_agnostic
        self.duplicate_iou = duplicate_iou
        self._tracks: list[Track] = []
        self._next_id = 1
        self._ts = float("-inf")
        self._frame = -1

    def update(self, dets: Detections, ts: float, frame: int | None = None) -> list[TrackEvent]:
        """Feed one frame's detections (frame pixels) taken at `ts` seconds; get its events.

        `frame`: the frame's number (the camera counter); None: the one after the last.
        Events come ends first, then starts, then updates. A `ts` earlier than the last one
        (a clock stepped back) counts as the last one.
        """
        ts = self._ts = max(float(ts), self._ts)
        frame = self._frame = self._frame + 1 if frame is None else int(frame)
        pairs = self._match(dets, frame)
        matched_t = {t for t, _ in pairs}
        matched_d = {d for _, d in pairs}
        ends: list[TrackEvent] = []
        starts: list[TrackEvent] = []
        updates: list[TrackEvent] = []
        for t, d in pairs:
            self._continue(self._tracks[t], dets, d, ts, frame)
        taken = [(dets.boxes[d], self._tracks[t]) for t, d in pairs]
        fresh: list[Track] = []
        for d in self._unmatched(dets, matched_d):
            dup = self._duplicate_of(dets.boxes[d], taken)
            if dup is not None:
                dup.vote(int(dets.classes[d]), float(dets.scores[d]))
                continue
            track = Track(
                self._next_id,
                int(dets.classes[d]),
                _box(dets.boxes[d]),
                float(dets.scores[d]),
                ts,
                ts,
                first_frame=frame,
                last_frame=frame,
            )
            track.votes[track.class_index] = track.score
            self._next_id += 1
            fresh.append(track)
            taken.append((dets.boxes[d], track))
        # Events after every vote of the frame is in: they carry the class as voted now.
        for t, _ in pairs:
            track = self._tracks[t]
            if not track.confirmed and track.frames >= self.min_hits:
                starts.append(self._confirm(track, ts, frame))
            elif track.confirmed and self._worth_update(track, ts):
                updates.append(self._report(track, "update", ts, frame))
        survivors: list[Track] = []
        for t, track in enumerate(self._tracks):
            if t in matched_t:
                survivors.append(track)
                continue
            track.missed += 1
            if not track.confirmed:
                continue  # a tentative track must be seen frame after frame
            late = self.max_missed_s is not None and ts - track.last_ts >= self.max_missed_s
            if track.missed >= self.max_missed or late:
                ends.append(track.event("end", ts, frame))
            else:
                survivors.append(track)
        for track in fresh:
            survivors.append(track)
            if self.min_hits <= 1:
                starts.append(self._confirm(track, ts, frame))
        self._tracks = sorted(survivors, key=lambda tr: tr.track_id)
        return ends + starts + updates

    def flush(self, ts: float, frame: int | None = None) -> list[TrackEvent]:
        """End every confirmed track now (shutdown, model switch); forget tentative ones.

        `frame`: the last frame seen (None: the last one given to `update`)."""
        ts = self._ts = max(float(ts), self._ts)
        frame = self._frame = self._frame if frame is None else max(int(frame), self._frame)
        ends = [tr.event("end", ts, frame) for tr in self._tracks if tr.confirmed]
        self._tracks = []
        return ends

    def settled(self) -> bool:
        """No track waits to be confirmed or ended: every one was matched in the last update.

        While a track is tentative or missing, the next frames decide whether it starts or
        ends, so a motion gate must not skip them (agent/runtime/objects.py).
        """
        return all(tr.confirmed and tr.missed == 0 for tr in self._tracks)

    def active(self) -> list[Track]:
        """Copies of the confirmed live tracks, by id."""
        return [dataclasses.replace(tr) for tr in self._tracks if tr.confirmed]

    def counts(self) -> dict[int, int]:
        """Confirmed live tracks per (voted) class index."""
        return dict(Counter(tr.class_index for tr in self._tracks if tr.confirmed))

    def _match(self, dets: Detections, frame: int) -> list[tuple[int, int]]:
        if not self._tracks or len(dets) == 0:
            return []
        last = np.array([tr.box for tr in self._tracks], np.float64)
        ahead = np.array([tr.predicted(frame) for tr in self._tracks], np.float64)
        # Where it was or where it is heading: an object that stopped behind an occluder
        # is found at its old place, one that kept moving at its predicted one.
        moved = iou_matrix(ahead, dets.boxes)
        overlap = np.maximum(iou_matrix(last, dets.boxes), moved)
        if self.class_agnostic:
            # Two objects crossing: when one's detection lands on where the other was, the
            # old-place overlap ties with the predicted one; ordering by both lets the
            # velocity decide. Which pairs may match is still decided by `overlap` alone.
            return _greedy(overlap, self.iou, order_by=overlap + moved)
        classes = np.array([tr.class_index for tr in self._tracks])
        overlap[classes[:, None] != dets.classes[None, :]] = 0.0
        return _greedy(overlap, self.iou)

    def _unmatched(self, dets: Detections, matched: set[int]) -> list[int]:
        """Detections that continued no track; best score first when duplicates matter."""
        rest = [d for d in range(len(dets)) if d not in matched]
        if self.class_agnostic:
            rest.sort(key=lambda d: -float(dets.scores[d]))
        return rest

    def _duplicate_of(
        self, box: npt.NDArray[np.float32], taken: list[tuple[npt.NDArray[np.float32], Track]]
    ) -> Track | None:
        """The track whose box this frame `box` repeats (class-agnostic only), if any."""
        if not self.class_agnostic or not taken:
            return None
        overlap = iou_matrix([box], [b for b, _ in taken])[0]
        k = int(np.argmax(overlap))
        return taken[k][1] if overlap[k] >= self.duplicate_iou else None

    def _continue(self, track: Track, dets: Detections, d: int, ts: float, frame: int) -> None:
        box = _box(dets.boxes[d])
        df = frame - track.last_frame
        if df > 0:
            seen = _comb(box, track.box, 1.0 / df, -1.0 / df)
            # Smoothed over the frames (detector boxes jitter); the first is taken as is.
            w = 1.0 if track.frames == 1 else 0.5
            track.velocity = _comb(seen, track.velocity, w, 1.0 - w)
        track.box = box
        track.score = max(track.score, float(dets.scores[d]))
        track.vote(int(dets.classes[d]), float(dets.scores[d]))
        track.last_ts = ts
        track.last_frame = frame
        track.frames += 1
        track.missed = 0

    def _confirm(self, track: Track, ts: float, frame: int) -> TrackEvent:
        track.confirmed = True
        return self._report(track, "start", ts, frame)

    def _report(self, track: Track, kind: EventKind, ts: float, frame: int) -> TrackEvent:
        track.reported_box, track.reported_score, track.reported_ts = track.box, track.score, ts
        track.reported_class = track.class_index
        return track.event(kind, ts, frame)

    def _worth_update(self, track: Track, ts: float) -> bool:
        if ts - track.reported_ts < self.update_interval_s:
            return False
        if track.score > track.reported_score or track.class_index != track.reported_class:
            return True
        moved = iou_matrix([track.box], [track.reported_box])[0, 0]
        return bool(moved < self.move_iou)


def _comb(a: Box, b: Box, ka: float, kb: float) -> Box:
    """ka * a + kb * b, edge by edge."""
    return (
        ka * a[0] + kb * b[0],
        ka * a[1] + kb * b[1],
        ka * a[2] + kb * b[2],
        ka * a[3] + kb * b[3],
    )


def _box(row: npt.NDArray[np.float32]) -> Box:
    return (float(row[0]), float(row[1]), float(row[2]), float(row[3]))


def _greedy(
    overlap: npt.NDArray[np.float64],
    least: float,
    order_by: npt.NDArray[np.float64] | None = None,
) -> list[tuple[int, int]]:
    """(track, detection) pairs, highest `order_by` (default: overlap) first, each used once,
    overlap >= least."""
    rows, cols = np.nonzero(overlap >= least)
    key = overlap if order_by is None else order_by
    order = np.argsort(-key[rows, cols], kind="stable")
    used_t: set[int] = set()
    used_d: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order:
        t, d = int(rows[k]), int(cols[k])
        if t not in used_t and d not in used_d:
            used_t.add(t)
            used_d.add(d)
            pairs.append((t, d))
    return pairs
