"""A detector's per-frame path: motion gate, model, zones, tracker; events and boxes out.

No I/O here: the agent's loop (service.py) publishes what a step returns, so the whole
path runs in tests on frames alone. Tracking counts frames the detector ran: a frame the
gate skips leaves every track as it is (docs/detect.md, "Agent").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgefleet.agent.bundle.manifest import Gate
from edgefleet.agent.config import DetectConfig
from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.gate import MotionGate
from edgefleet.agent.detect.tracker import IouTracker, Track, TrackEvent
from edgefleet.agent.detect.zones import Zone, in_any_zone
from edgefleet.agent.protocol.messages import MAX_OBJECTS, DetectedObject

from .detector import DetectorModel
from .preprocess import Frame, Preprocessor

DetailValue = str | int | float | bool | None
EventKindName = Literal["object_start", "object_update", "object_end"]
_KINDS: dict[str, EventKindName] = {
    "start": "object_start",
    "update": "object_update",
    "end": "object_end",
}


@dataclass(frozen=True)
class ObjectEvent:
    """One `events` message about a tracked object, ready for Agent.event."""

    kind: EventKindName
    message: str
    details: dict[str, DetailValue]


@dataclass
class Step:
    """What one frame gave: run or skipped; the boxes, stage times, events and result boxes."""

    ran: bool
    detections: Detections = field(default_factory=Detections.empty)
    stage_ms: list[float] = field(default_factory=list)
    events: list[ObjectEvent] = field(default_factory=list)
    objects: list[DetectedObject] = field(default_factory=list)
    tracked: frozenset[int] = frozenset()  # ids of confirmed live tracks after this frame
    counts: dict[str, int] = field(default_factory=dict)  # confirmed live tracks per label
    started: int = 0  # tracks confirmed on this frame


def _px(v: float) -> float:
    # Tenths of a pixel: what a box is good for, and short on the wire.
    return round(max(0.0, float(v)), 1)


class DetectPipeline:
    """Gate -> DetectorModel -> zones -> IouTracker for one running detect bundle."""

    def __init__(self, model: DetectorModel, cfg: DetectConfig, gate: Gate | None) -> None:
        self.model = model
        self.cfg = cfg
        self.labels = model.manifest.labels
        self.zones: list[Zone] = list(cfg.zones)
        t = cfg.tracker
        # The tracker rate-limits its own updates (and sends one only when the box moved or
        # the score rose); None in the config means no object_update events at all.
        every = t.update_interval_s if t.update_interval_s is not None else 0.0
        self.tracker = IouTracker(
            iou=t.iou,
            max_missed=t.max_missed,
            min_hits=t.min_hits,
            update_interval_s=every,
            class_agnostic=t.class_agnostic,
        )
        self._frame = -1  # the last frame offered to step, skipped or not
        self.gate: MotionGate | None = None
        self.set_gate(gate)

    def set_gate(self, gate: Gate | None) -> None:
        """The active operating point's gate (None or no motion threshold: every frame runs)."""
        self.gate = MotionGate(gate) if gate is not None and gate.motion is not None else None

    def step(self, image: Frame, ts: float, pre: Preprocessor, frame: int | None = None) -> Step:
        """One camera frame; FrameError and DecodeError pass to the caller (frame rejected).

        `frame`: the camera's frame counter, which the events name (None: this pipeline's
        own count of steps, from 0)."""
        frame = self._frame = self._frame + 1 if frame is None else int(frame)
        # A still frame is skipped only while the tracker is settled: an object that just
        # appeared needs min_hits runs in a row to start, and one that just left needs
        # max_missed runs to end, which a quiet scene would otherwise put off until the
        # gate's max_skip (seconds late, or an appearance never confirmed).
        if self.gate is not None and not self.gate.should_run(
            image, force=not self.tracker.settled()
        ):
            return Step(ran=False)
        found = self.model.detect_frame(image, pre)
        dets = self._in_zones(found.detections)
        events = self.tracker.update(dets, ts, frame)
        out = [e for e in (self._event(ev) for ev in events) if e is not None]
        tracks = [tr for tr in self.tracker.active() if tr.confirmed]
        counts: dict[str, int] = {}
        for cls, n in self.tracker.counts().items():
            label = self._label(cls)
            counts[label] = counts.get(label, 0) + n
        return Step(
            ran=True,
            detections=dets,
            stage_ms=found.stage_ms,
            events=out,
            objects=self._objects(dets, tracks),
            tracked=frozenset(tr.track_id for tr in tracks),
            counts=counts,
            started=sum(ev.kind == "start" for ev in events),
        )

    def flush(self, ts: float) -> list[ObjectEvent]:
        """End every live track (model switch, shutdown): their object_end events."""
        events = self.tracker.flush(ts, self._frame if self._frame >= 0 else None)
        return [e for e in (self._event(ev) for ev in events) if e is not None]

    # -- parts ---------------------------------------------------------------------------

    def _label(self, cls: int) -> str:
        return self.labels[cls] if 0 <= cls < len(self.labels) else str(cls)

    def _in_zones(self, dets: Detections) -> Detections:
        return in_any_zone(dets, self.zones) if len(dets) else dets

    def _zone_of(self, box: Sequence[float]) -> str | None:
        return next((z.name for z in self.zones if z.in_zone(box)), None)

    def _event(self, ev: TrackEvent) -> ObjectEvent | None:
        kind = _KINDS[ev.kind]
        if kind == "object_update" and self.cfg.tracker.update_interval_s is None:
            return None
        x1, y1, x2, y2 = (float(v) for v in ev.box)
        label = self._label(ev.class_index)
        duration = max(0.0, ev.ts - ev.start_ts)
        zone = self._zone_of((x1, y1, x2, y2))
        where = f" in {zone}" if zone else ""
        if kind == "object_start":
            message = f"{label} #{ev.track_id} appeared{where} (score {ev.score:.2f})"
        elif kind == "object_end":
            message = (
                f"{label} #{ev.track_id} gone{where} after {duration:.1f} s ({ev.frames} frames)"
            )
        else:
            message = f"{label} #{ev.track_id} still there{where} after {duration:.1f} s"
        details: dict[str, DetailValue] = {
            "track_id": int(ev.track_id),
            "class_index": int(ev.class_index),
            "label": label[:1000],
            "score": round(float(ev.score), 4),
            "x1": _px(x1),
            "y1": _px(y1),
            "x2": _px(x2),
            "y2": _px(y2),
            "duration_s": round(duration, 3),
            "frames": int(ev.frames),
            "start_ts": float(ev.start_ts),
            "zone": zone,
            "frame": int(ev.frame),
            "first_frame": int(ev.first_frame),
        }
        if kind == "object_end":
            details["last_frame"] = int(ev.last_frame)
        return ObjectEvent(kind, message, details)

    def _objects(self, dets: Detections, tracks: Sequence[Track]) -> list[DetectedObject]:
        """The boxes a result carries (config detect.results), best first, at most 50."""
        rows: list[tuple[float, int, tuple[float, ...], int | None]]
        if self.cfg.results == "tracked":
            rows = [
                (float(tr.score), int(tr.class_index), tuple(map(float, tr.box)), tr.track_id)
                for tr in tracks
                if tr.missed == 0  # seen on this frame
            ]
        else:
            ids = self._track_ids(dets, tracks)
            triples = zip(dets.boxes, dets.scores, dets.classes, strict=True)
            rows = [
                (float(s), int(c), tuple(map(float, b)), ids[i])
                for i, (b, s, c) in enumerate(triples)
            ]
        rows.sort(key=lambda r: -r[0])
        return [
            DetectedObject(
                class_index=c,
                label=self._label(c)[:64] or "?",
                score=min(1.0, max(0.0, s)),
                x1=_px(b[0]),
                y1=_px(b[1]),
                x2=max(_px(b[0]), _px(b[2])),
                y2=max(_px(b[1]), _px(b[3])),
                track_id=tid,
            )
            for s, c, b, tid in rows[:MAX_OBJECTS]
        ]

    @staticmethod
    def _track_ids(dets: Detections, tracks: Sequence[Track]) -> list[int | None]:
        """For 'all' results: the confirmed track whose last box is this detection's."""
        ids: list[int | None] = [None] * len(dets)
        for tr in tracks:
            box = np.asarray(tr.box, np.float32)
            for i, b in enumerate(dets.boxes):
                if ids[i] is None and np.allclose(b, box, atol=1e-3):
                    ids[i] = int(tr.track_id)
                    break
        return ids
