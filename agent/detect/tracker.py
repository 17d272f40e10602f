"""Per-frame boxes -> tracks with start / update / end events (a small IoU tracker).

A detection continues the track of its class whose box (last, or moved on by the track's
velocity) overlaps it most, greedily by IoU; no appearance model, no Kalman filter: on a
Pi, the detector is the expensive part and objects move little between frames. A track
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
    it was seen.
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
    velocity: Box = (0.0, 0.0, 0.0, 0.0)  # box edges, pixels per second
    reported_box: Box = field(default=(0.0, 0.0, 0.0, 0.0), repr=False)
    reported_score: float = field(default=0.0, repr=False)
    reported_ts: float = field(default=0.0, repr=False)

    def predicted(self, ts: float) -> Box:
        """The box moved on by the velocity to time ts."""
        return _comb(self.box, self.velocity, 1.0, ts - self.last_ts)

    def event(self, kind: EventKind, ts: float) -> TrackEvent:
        """This track as an event of `kind` at `ts`."""
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
        )


class IouTracker:
    """Tracks per class by greedy IoU matching; `update` once per detector run."""

    def __init__(
        self,
        iou: float = 0.3,
        max_missed: int = 15,
        min_hits: int = 3,
        *,
        max_missed_s: float | None = None,
        update_interval_s: float = 1.0,
        move_iou: float = 0.7,
    ) -> None:
        """iou: least overlap that continues a track. update_interval_s: least time between
        two "update" events of a track, sent only when its box moved (IoU with the last
        reported box below move_iou) or its best score rose."""
        if not 0.0 < iou <= 1.0 or not 0.0 < move_iou <= 1.0:
            raise ValueError(f"iou {iou} and move_iou {move_iou} must be in (0, 1]")
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
        self._tracks: list[Track] = []
        self._next_id = 1
        self._ts = float("-inf")

    def update(self, dets: Detections, ts: float) -> list[TrackEvent]:
        """Feed one frame's detections (frame pixels) taken at `ts` seconds; get its events.

        Events come ends first, then starts, then updates. A `ts` earlier than the last one
        (a clock stepped back) counts as the last one.
        """
        ts = self._ts = max(float(ts), self._ts)
        pairs = self._match(dets, ts)
        matched_t = {t for t, _ in pairs}
        matched_d = {d for _, d in pairs}
        ends: list[TrackEvent] = []
        starts: list[TrackEvent] = []
        updates: list[TrackEvent] = []
        for t, d in pairs:
            track = self._tracks[t]
            self._continue(track, dets, d, ts)
            if not track.confirmed and track.frames >= self.min_hits:
                starts.append(self._confirm(track, ts))
            elif track.confirmed and self._worth_update(track, ts):
                updates.append(self._report(track, "update", ts))
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
                ends.append(track.event("end", ts))
            else:
                survivors.append(track)
        for d in range(len(dets)):
            if d in matched_d:
                continue
            track = Track(
                self._next_id,
                int(dets.classes[d]),
                _box(dets.boxes[d]),
                float(dets.scores[d]),
                ts,
                ts,
            )
            self._next_id += 1
            survivors.append(track)
            if self.min_hits <= 1:
                starts.append(self._confirm(track, ts))
        self._tracks = sorted(survivors, key=lambda tr: tr.track_id)
        return ends + starts + updates

    def flush(self, ts: float) -> list[TrackEvent]:
        """End every confirmed track now (shutdown, model switch); forget tentative ones."""
        ts = self._ts = max(float(ts), self._ts)
        ends = [tr.event("end", ts) for tr in self._tracks if tr.confirmed]
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
        """Confirmed live tracks per class index."""
        return dict(Counter(tr.class_index for tr in self._tracks if tr.confirmed))

    def _match(self, dets: Detections, ts: float) -> list[tuple[int, int]]:
        if not self._tracks or len(dets) == 0:
            return []
        last = np.array([tr.box for tr in self._tracks], np.float64)
        ahead = np.array([tr.predicted(ts) for tr in self._tracks], np.float64)
        # Where it was or where it is heading: an object that stopped behind an occluder
        # is found at its old place, one that kept moving at its predicted one.
        overlap = np.maximum(iou_matrix(last, dets.boxes), iou_matrix(ahead, dets.boxes))
        classes = np.array([tr.class_index for tr in self._tracks])
        overlap[classes[:, None] != dets.classes[None, :]] = 0.0
        return _greedy(overlap, self.iou)

    def _continue(self, track: Track, dets: Detections, d: int, ts: float) -> None:
        box = _box(dets.boxes[d])
        dt = ts - track.last_ts
        if dt > 0:
            seen = _comb(box, track.box, 1.0 / dt, -1.0 / dt)
            # Smoothed over the frames (detector boxes jitter); the first is taken as is.
            w = 1.0 if track.frames == 1 else 0.5
            track.velocity = _comb(seen, track.velocity, w, 1.0 - w)
        track.box = box
        track.score = max(track.score, float(dets.scores[d]))
        track.last_ts = ts
        track.frames += 1
        track.missed = 0

    def _confirm(self, track: Track, ts: float) -> TrackEvent:
        track.confirmed = True
        return self._report(track, "start", ts)

    def _report(self, track: Track, kind: EventKind, ts: float) -> TrackEvent:
        track.reported_box, track.reported_score, track.reported_ts = track.box, track.score, ts
        return track.event(kind, ts)

    def _worth_update(self, track: Track, ts: float) -> bool:
        if ts - track.reported_ts < self.update_interval_s:
            return False
        if track.score > track.reported_score:
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


def _greedy(overlap: npt.NDArray[np.float64], least: float) -> list[tuple[int, int]]:
    """(track, detection) pairs, highest overlap first, each used once, overlap >= least."""
    rows, cols = np.nonzero(overlap >= least)
    order = np.argsort(-overlap[rows, cols], kind="stable")
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
