"""The IoU tracker on scripted scenes: one object, one start and one end."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.tracker import IouTracker, TrackEvent

FPS = 10.0
Row = tuple[float, float, float, float, float, int]  # x1, y1, x2, y2, score, class


def _dets(*objs: Row) -> Detections:
    """Detections from (x1, y1, x2, y2, score, class) rows."""
    if not objs:
        return Detections.empty()
    a = np.asarray(objs, np.float64)
    return Detections.of(a[:, :4], a[:, 4], a[:, 5])


def _run(
    tracker: IouTracker, frames: Sequence[Detections], t0: float = 0.0
) -> list[tuple[int, TrackEvent]]:
    """(frame index, event) for every event of the scripted frames at FPS."""
    out: list[tuple[int, TrackEvent]] = []
    for i, dets in enumerate(frames):
        out += [(i, e) for e in tracker.update(dets, t0 + i / FPS)]
    return out


def _kinds(events: list[tuple[int, TrackEvent]], kind: str) -> list[tuple[int, TrackEvent]]:
    return [(i, e) for i, e in events if e.kind == kind]


def _crossing(x0: float, step: float, n: int, y: float = 100, cls: int = 0) -> list[Row]:
    return [(x0 + step * i, y, x0 + step * i + 40, y + 40, 0.8, cls) for i in range(n)]


def test_one_object_crossing_is_one_start_and_one_end() -> None:
    rows = _crossing(0, 10, 30)
    frames = [_dets(r) for r in rows] + [_dets()] * 20
    tracker = IouTracker(max_missed=5, min_hits=3)
    events = _run(tracker, frames)
    starts, ends = _kinds(events, "start"), _kinds(events, "end")
    assert len(starts) == 1 and len(ends) == 1
    assert {e.track_id for _, e in events} == {starts[0][1].track_id}
    (i_start, start), (i_end, end) = starts[0], ends[0]
    assert i_start == 2 and start.start_ts == 0.0 and start.frames == 3
    # last seen in frame 29, gone at the 5th frame without it
    assert i_end == 34 and end.last_ts == pytest.approx(2.9) and end.ts == pytest.approx(3.4)
    assert end.frames == 30 and end.box == pytest.approx(rows[-1][:4])
    assert end.score == pytest.approx(0.8)
    # moving: updates, at most one per second, and only between start and end
    updates = _kinds(events, "update")
    assert updates and all(i_start < i < i_end for i, _ in updates)
    times = [e.ts for _, e in updates]
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))
    assert tracker.active() == [] and tracker.counts() == {}


@pytest.mark.parametrize(("dy", "classes"), [(10, (0, 0)), (0, (0, 0)), (0, (0, 1))])
def test_two_objects_crossing_keep_their_ids(dy: float, classes: tuple[int, int]) -> None:
    right = _crossing(0, 8, 40, y=100, cls=classes[0])  # 0 -> 312
    left = _crossing(312, -8, 40, y=100 + dy, cls=classes[1])  # 312 -> 0, same frames
    frames = [_dets(a, b) for a, b in zip(right, left, strict=True)] + [_dets()] * 10
    events = _run(IouTracker(max_missed=5), frames)
    starts, ends = _kinds(events, "start"), _kinds(events, "end")
    assert len(starts) == 2 and len(ends) == 2
    by_id = {e.track_id: e for _, e in ends}
    first = {e.box[0]: e.track_id for _, e in starts}  # start x -> id
    # the track that started on the left ends on the right, and the other way round
    assert by_id[first[min(first)]].box[0] == pytest.approx(312)
    assert by_id[first[max(first)]].box[0] == pytest.approx(0)
    assert all(e.frames == 40 for e in by_id.values())


def test_short_occlusion_keeps_the_track_and_leaving_ends_it() -> None:
    rows = _crossing(0, 5, 40)
    frames = [_dets(r) for r in rows]
    for i in range(15, 19):  # hidden for 4 frames (< max_missed = 5)
        frames[i] = _dets()
    frames += [_dets()] * 6
    events = _run(IouTracker(max_missed=5), frames)
    assert [e.kind for _, e in events if e.kind != "update"] == ["start", "end"]
    end = _kinds(events, "end")[0]
    assert end[0] == 39 + 5 and end[1].frames == 36


def test_occlusion_as_long_as_max_missed_ends_the_track() -> None:
    rows = _crossing(0, 5, 40)
    frames = [_dets(r) for r in rows]
    for i in range(15, 20):  # 5 frames: the track ends; the object comes back as a new one
        frames[i] = _dets()
    events = _run(IouTracker(max_missed=5), frames)
    assert [(i, e.kind) for i, e in events if e.kind != "update"] == [
        (2, "start"),
        (19, "end"),
        (22, "start"),
    ]


def test_time_limit_ends_a_track_even_when_frames_are_few() -> None:
    frames = [_dets((0, 0, 40, 40, 0.9, 0))] * 3 + [_dets()] * 20
    events = _run(IouTracker(max_missed=100, max_missed_s=1.0), frames)
    end = _kinds(events, "end")
    # last seen at .2 s; the first frame at least 1 s later is frame 12 (1.2 s)
    assert len(end) == 1 and end[0][0] == 12


def test_single_frame_false_positives_make_no_event() -> None:
    rng = np.random.default_rng(3)
    frames = []
    for i in range(60):
        if i % 2:  # every other frame: one in a random place, one always at the same place
            x, y = rng.uniform(0, 600, 2)
            frames.append(_dets((x, y, x + 30, y + 30, 0.9, 0), (10, 10, 50, 50, 0.9, 1)))
        else:
            frames.append(_dets())
    tracker = IouTracker(min_hits=3)
    assert _run(tracker, frames) == []
    assert tracker.counts() == {} and tracker.active() == []
    assert tracker.flush(10.0) == []


def test_min_hits_one_starts_at_once() -> None:
    tracker = IouTracker(min_hits=1)
    events = tracker.update(_dets((0, 0, 10, 10, 0.5, 2)), 0.0)
    assert [(e.kind, e.class_index, e.frames) for e in events] == [("start", 2, 1)]


def test_counts_per_class_only_confirmed() -> None:
    tracker = IouTracker(min_hits=2)
    people = [(0, 0, 40, 80, 0.9, 0), (100, 0, 140, 80, 0.9, 0)]
    car = (200, 0, 300, 60, 0.7, 1)
    tracker.update(_dets(*people, car), 0.0)
    assert tracker.counts() == {}
    tracker.update(_dets(*people, car, (400, 0, 420, 20, 0.6, 1)), 0.1)
    assert tracker.counts() == {0: 2, 1: 1}
    assert sorted(t.class_index for t in tracker.active()) == [0, 0, 1]


def test_updates_need_change_and_respect_the_interval() -> None:
    still = [_dets((0, 0, 40, 40, 0.6, 0))] * 40
    assert _kinds(_run(IouTracker(), still), "update") == []
    # the score climbs every frame: updates, but at most one per 2 s
    rising = [_dets((0, 0, 40, 40, 0.3 + 0.01 * i, 0)) for i in range(40)]
    updates = _kinds(_run(IouTracker(update_interval_s=2.0), rising), "update")
    assert [i for i, _ in updates] == [22]  # start at frame 2 (0.2 s), then 2.2 s
    assert updates[0][1].score == pytest.approx(0.3 + 0.01 * 22)


def test_flush_ends_confirmed_tracks_and_ids_are_never_reused() -> None:
    tracker = IouTracker(min_hits=2)
    a = (0, 0, 40, 40, 0.9, 0)
    tracker.update(_dets(a), 0.0)
    tracker.update(_dets(a, (100, 100, 140, 140, 0.9, 1)), 0.1)  # the second is tentative
    ends = tracker.flush(0.5)
    assert [(e.kind, e.track_id, e.ts, e.last_ts) for e in ends] == [("end", 1, 0.5, 0.1)]
    assert tracker.active() == []
    tracker.update(_dets(a), 0.6)
    assert [e.track_id for e in tracker.update(_dets(a), 0.7)] == [3]


def test_clock_stepping_back_counts_as_now() -> None:
    tracker = IouTracker(min_hits=2)
    tracker.update(_dets((0, 0, 40, 40, 0.9, 0)), 5.0)
    (start,) = tracker.update(_dets((0, 0, 40, 40, 0.9, 0)), 4.0)
    assert start.ts == 5.0 and start.start_ts == 5.0


@pytest.mark.parametrize(
    "kw",
    [{"iou": 0.0}, {"max_missed": 0}, {"min_hits": 0}, {"max_missed_s": 0.0}, {"move_iou": 1.5}],
)
def test_bad_parameters_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        IouTracker(**kw)  # type: ignore[arg-type]


def test_settled_only_when_every_track_is_confirmed_and_matched() -> None:
    tracker = IouTracker(min_hits=2, max_missed=3)
    assert tracker.settled()
    box = (10.0, 10.0, 30.0, 30.0, 0.9, 0)
    tracker.update(_dets(box), 0.0)
    assert not tracker.settled()  # tentative: the next frame decides
    tracker.update(_dets(box), 0.1)
    assert tracker.settled()
    tracker.update(_dets(), 0.2)
    assert not tracker.settled()  # missing: the next frames decide whether it ended
    tracker.update(_dets(), 0.3)
    tracker.update(_dets(), 0.4)
    assert tracker.settled() and tracker.active() == []
