"""The IoU tracker on scripted scenes: one object, one start and one end.

Every scene runs both ways (class_agnostic True and False) unless it is about the
difference: a detector that reads a digit as another for a few frames."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.tracker import IouTracker, TrackEvent

FPS = 10.0
Row = tuple[float, float, float, float, float, int]  # x1, y1, x2, y2, score, class


pytestmark = pytest.mark.parametrize("agnostic", [False, True], ids=["per_class", "agnostic"])


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


def test_one_object_crossing_is_one_start_and_one_end(agnostic: bool) -> None:
    rows = _crossing(0, 10, 30)
    frames = [_dets(r) for r in rows] + [_dets()] * 20
    tracker = IouTracker(class_agnostic=agnostic, max_missed=5, min_hits=3)
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
def test_two_objects_crossing_keep_their_ids(
    dy: float, classes: tuple[int, int], agnostic: bool
) -> None:
    right = _crossing(0, 8, 40, y=100, cls=classes[0])  # 0 -> 312
    left = _crossing(312, -8, 40, y=100 + dy, cls=classes[1])  # 312 -> 0, same frames
    frames = [_dets(a, b) for a, b in zip(right, left, strict=True)] + [_dets()] * 10
    events = _run(IouTracker(class_agnostic=agnostic, max_missed=5), frames)
    starts, ends = _kinds(events, "start"), _kinds(events, "end")
    assert len(starts) == 2 and len(ends) == 2
    by_id = {e.track_id: e for _, e in ends}
    first = {e.box[0]: e.track_id for _, e in starts}  # start x -> id
    # the track that started on the left ends on the right, and the other way round
    assert by_id[first[min(first)]].box[0] == pytest.approx(312)
    assert by_id[first[max(first)]].box[0] == pytest.approx(0)
    assert all(e.frames == 40 for e in by_id.values())


def test_short_occlusion_keeps_the_track_and_leaving_ends_it(agnostic: bool) -> None:
    rows = _crossing(0, 5, 40)
    frames = [_dets(r) for r in rows]
    for i in range(15, 19):  # hidden for 4 frames (< max_missed = 5)
        frames[i] = _dets()
    frames += [_dets()] * 6
    events = _run(IouTracker(class_agnostic=agnostic, max_missed=5), frames)
    assert [e.kind for _, e in events if e.kind != "update"] == ["start", "end"]
    end = _kinds(events, "end")[0]
    assert end[0] == 39 + 5 and end[1].frames == 36


def test_occlusion_as_long_as_max_missed_ends_the_track(agnostic: bool) -> None:
    rows = _crossing(0, 5, 40)
    frames = [_dets(r) for r in rows]
    for i in range(15, 20):  # 5 frames: the track ends; the object comes back as a new one
        frames[i] = _dets()
    events = _run(IouTracker(class_agnostic=agnostic, max_missed=5), frames)
    assert [(i, e.kind) for i, e in events if e.kind != "update"] == [
        (2, "start"),
        (19, "end"),
        (22, "start"),
    ]


def test_time_limit_ends_a_track_even_when_frames_are_few(agnostic: bool) -> None:
    frames = [_dets((0, 0, 40, 40, 0.9, 0))] * 3 + [_dets()] * 20
    events = _run(IouTracker(class_agnostic=agnostic, max_missed=100, max_missed_s=1.0), frames)
    end = _kinds(events, "end")
    # last seen at .2 s; the first frame at least 1 s later is frame 12 (1.2 s)
    assert len(end) == 1 and end[0][0] == 12


def test_single_frame_false_positives_make_no_event(agnostic: bool) -> None:
    rng = np.random.default_rng(3)
    frames = []
    for i in range(60):
        if i % 2:  # every other frame: one in a random place, one always at the same place
            x, y = rng.uniform(0, 600, 2)
            frames.append(_dets((x, y, x + 30, y + 30, 0.9, 0), (10, 10, 50, 50, 0.9, 1)))
        else:
            frames.append(_dets())
    tracker = IouTracker(class_agnostic=agnostic, min_hits=3)
    assert _run(tracker, frames) == []
    assert tracker.counts() == {} and tracker.active() == []
    assert tracker.flush(10.0) == []


def test_min_hits_one_starts_at_once(agnostic: bool) -> None:
    tracker = IouTracker(class_agnostic=agnostic, min_hits=1)
    events = tracker.update(_dets((0, 0, 10, 10, 0.5, 2)), 0.0)
    assert [(e.kind, e.class_index, e.frames) for e in events] == [("start", 2, 1)]


def test_counts_per_class_only_confirmed(agnostic: bool) -> None:
    tracker = IouTracker(class_agnostic=agnostic, min_hits=2)
    people = [(0, 0, 40, 80, 0.9, 0), (100, 0, 140, 80, 0.9, 0)]
    car = (200, 0, 300, 60, 0.7, 1)
    tracker.update(_dets(*people, car), 0.0)
    assert tracker.counts() == {}
    tracker.update(_dets(*people, car, (400, 0, 420, 20, 0.6, 1)), 0.1)
    assert tracker.counts() == {0: 2, 1: 1}
    assert sorted(t.class_index for t in tracker.active()) == [0, 0, 1]


def test_updates_need_change_and_respect_the_interval(agnostic: bool) -> None:
    still = [_dets((0, 0, 40, 40, 0.6, 0))] * 40
    assert _kinds(_run(IouTracker(class_agnostic=agnostic), still), "update") == []
    # the score climbs every frame: updates, but at most one per 2 s
    rising = [_dets((0, 0, 40, 40, 0.3 + 0.01 * i, 0)) for i in range(40)]
    updates = _kinds(
        _run(IouTracker(class_agnostic=agnostic, update_interval_s=2.0), rising), "update"
    )
    assert [i for i, _ in updates] == [22]  # start at frame 2 (0.2 s), then 2.2 s
    assert updates[0][1].score == pytest.approx(0.3 + 0.01 * 22)


def test_flush_ends_confirmed_tracks_and_ids_are_never_reused(agnostic: bool) -> None:
    tracker = IouTracker(class_agnostic=agnostic, min_hits=2)
    a = (0, 0, 40, 40, 0.9, 0)
    tracker.update(_dets(a), 0.0)
    tracker.update(_dets(a, (100, 100, 140, 140, 0.9, 1)), 0.1)  # the second is tentative
    ends = tracker.flush(0.5)
    assert [(e.kind, e.track_id, e.ts, e.last_ts) for e in ends] == [("end", 1, 0.5, 0.1)]
    assert tracker.active() == []
    tracker.update(_dets(a), 0.6)
    assert [e.track_id for e in tracker.update(_dets(a), 0.7)] == [3]


def test_clock_stepping_back_counts_as_now(agnostic: bool) -> None:
    tracker = IouTracker(class_agnostic=agnostic, min_hits=2)
    tracker.update(_dets((0, 0, 40, 40, 0.9, 0)), 5.0)
    (start,) = tracker.update(_dets((0, 0, 40, 40, 0.9, 0)), 4.0)
    assert start.ts == 5.0 and start.start_ts == 5.0


@pytest.mark.parametrize(
    "kw",
    [
        {"iou": 0.0},
        {"max_missed": 0},
        {"min_hits": 0},
        {"max_missed_s": 0.0},
        {"move_iou": 1.5},
        {"duplicate_iou": 0.0},
    ],
)
def test_bad_parameters_are_refused(kw: dict[str, float], agnostic: bool) -> None:
    with pytest.raises(ValueError):
        IouTracker(class_agnostic=agnostic, **kw)  # type: ignore[arg-type]


def test_settled_only_when_every_track_is_confirmed_and_matched(agnostic: bool) -> None:
    tracker = IouTracker(class_agnostic=agnostic, min_hits=2, max_missed=3)
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


# -- a detector that misreads: class votes (class_agnostic) vs per-class tracks -----------


def _flicker(rows: list[Row], frames: range, cls: int) -> list[Row]:
    return [(*r[:5], cls) if i in frames else r for i, r in enumerate(rows)]


def test_a_class_flicker_is_one_track_of_the_majority_class(agnostic: bool) -> None:
    # An 8 crossing, read as a 3 for 3 frames in the middle (as the reference detector does
    # while a digit overlaps another).
    rows = _flicker(_crossing(0, 10, 30, cls=8), range(12, 15), 3)
    frames = [_dets(r) for r in rows] + [_dets()] * 6
    tracker = IouTracker(class_agnostic=agnostic, max_missed=5, min_hits=3)
    events = _run(tracker, frames)
    starts, ends = _kinds(events, "start"), _kinds(events, "end")
    if not agnostic:
        # per class: the 3 is a track of its own (3 frames = min_hits), the 8 lives on
        assert sorted(e.class_index for _, e in starts) == [3, 8]
        return
    assert [(i, e.class_index) for i, e in starts] == [(2, 8)]
    assert [(i, e.class_index, e.frames) for i, e in ends] == [(34, 8, 30)]
    assert {e.track_id for _, e in events} == {starts[0][1].track_id}
    assert all(e.class_index == 8 for _, e in events)


def test_the_voted_class_can_change_and_start_update_end_say_so(agnostic: bool) -> None:
    # A still object read as 3 on its first 3 frames, then as 8: the start says 3 (the
    # votes at confirmation), an update the moment the 8s outweigh the 3s, the end 8.
    rows = [(50.0, 50.0, 90.0, 90.0, 0.8, 3 if i < 3 else 8) for i in range(20)]
    tracker = IouTracker(class_agnostic=agnostic, max_missed=3, min_hits=3, update_interval_s=0)
    counts: list[dict[int, int]] = []
    events: list[tuple[int, TrackEvent]] = []
    for i, r in enumerate([*rows, None, None, None]):
        events += [(i, e) for e in tracker.update(_dets(r) if r else _dets(), i / FPS)]
        counts.append(tracker.counts())
    kinds = [(i, e.kind, e.class_index) for i, e in events]
    if not agnostic:
        assert kinds == [(2, "start", 3), (5, "end", 3), (5, "start", 8), (22, "end", 8)]
        return
    # 3 x 0.8 for the 3; the 8 ties on frame 5 (the track keeps its class) and wins on 6
    assert kinds == [(2, "start", 3), (6, "update", 8), (22, "end", 8)]
    assert counts[2] == counts[5] == {3: 1} and counts[6] == counts[19] == {8: 1}
    assert [e.class_index for e in tracker.active()] == []


def test_objects_of_two_classes_crossing_keep_ids_even_when_misread(agnostic: bool) -> None:
    # A 1 going right and a 7 going left on the same line, boxes swapping places exactly
    # (frame 19: 152 | 160, frame 20: 160 | 152); around the crossing each is read as the
    # other's class, so only the velocity tells them apart.
    right = _flicker(_crossing(0, 8, 40, cls=1), range(17, 23), 7)
    left = _flicker(_crossing(312, -8, 40, cls=7), range(17, 23), 1)
    # The detector lists the boxes the other way round from the swap on (it lists them by
    # score): on frame 20 each box is also exactly where the other track was, so list order
    # would pair them wrongly if the overlaps' tie were not broken by the velocity.
    pairs = zip(right, left, strict=True)
    frames = [_dets(a, b) if i < 20 else _dets(b, a) for i, (a, b) in enumerate(pairs)]
    frames += [_dets()] * 6
    events = _run(IouTracker(class_agnostic=agnostic, max_missed=5), frames)
    starts, ends = _kinds(events, "start"), _kinds(events, "end")
    if not agnostic:
        # per class the misreads are tracks of their own (and the originals, missed for 6
        # frames, end and start again): more starts than objects
        assert len(starts) > 2
        return
    assert len(starts) == 2 and len(ends) == 2
    start_x = {e.track_id: e.box[0] for _, e in starts}
    got = sorted((start_x[e.track_id], e.box[0], e.class_index, e.frames) for _, e in ends)
    assert got == [(16, 312, 1, 40), (296, 0, 7, 40)]  # started on frame 2


def test_one_object_read_as_two_classes_in_one_frame_is_one_track(agnostic: bool) -> None:
    # Per-class NMS keeps an 8 and a 3 on the same digit; the weaker box is a vote, not a
    # second object (class-agnostic), or a second track (per class).
    eight, three = (50, 50, 90, 90, 0.8, 8), (51, 50, 90, 91, 0.5, 3)
    rows = [_dets(eight, three) if i >= 4 else _dets(eight) for i in range(10)]
    tracker = IouTracker(class_agnostic=agnostic, min_hits=2)
    events = _run(tracker, rows)
    if not agnostic:
        assert sorted(e.class_index for _, e in _kinds(events, "start")) == [3, 8]
        return
    assert [(i, e.kind, e.class_index) for i, e in events] == [(1, "start", 8)]
    (track,) = tracker.active()
    assert track.votes == pytest.approx({8: 8.0, 3: 3.0}) and track.frames == 10


def test_events_carry_frame_numbers(agnostic: bool) -> None:
    # Frames as a camera counts them, with gaps (a gate skipped those): events name the
    # frame that made them, the track's first frame and its last matched one.
    tracker = IouTracker(class_agnostic=agnostic, min_hits=2, max_missed=2)
    box = _dets((0, 0, 40, 40, 0.9, 0))
    got = []
    for frame, dets in [(101, box), (103, box), (104, box), (110, _dets()), (111, _dets())]:
        got += tracker.update(dets, frame / FPS, frame)
    assert [(e.kind, e.frame, e.first_frame, e.last_frame) for e in got] == [
        ("start", 103, 101, 103),
        ("end", 111, 101, 104),
    ]
    # without numbers: the tracker counts its own updates from 0
    counted = IouTracker(class_agnostic=agnostic, min_hits=1)
    counted.update(_dets(), 0.0)
    (start,) = counted.update(box, 0.1)
    (end,) = counted.flush(0.5)
    assert (start.frame, start.first_frame, end.frame, end.last_frame) == (1, 1, 1, 1)
    assert counted.flush(0.6, 7) == []


def test_velocity_is_per_frame_so_irregular_frame_times_do_not_split_a_track(
    agnostic: bool,
) -> None:
    # A replayed file's frames are stamped when decoded: two a fraction of a millisecond
    # apart, then one tens of milliseconds later (the detector's time). A 40-pixel box moving
    # 30 pixels a frame overlaps its last box at IoU 0.14, under the tracker's 0.3, so only
    # the prediction finds it; a velocity per second, learnt over 0.5 ms and applied over
    # 60 ms, put the prediction hundreds of pixels off and started a track every few frames.
    steps = [min(5.0 * i, 30.0) for i in range(30)]  # speeding up to 30 pixels a frame
    rows: list[Row] = [(x, 100, x + 40, 140, 0.8, 0) for x in itertools.accumulate(steps)]
    frames = [_dets(r) for r in rows] + [_dets()] * 10
    tracker = IouTracker(class_agnostic=agnostic, max_missed=5, min_hits=3)
    ts = list(itertools.accumulate((0.0005 if i % 2 else 0.06) for i in range(len(frames))))
    events = [e for i, d in enumerate(frames) for e in tracker.update(d, ts[i], i)]
    starts, ends = _kinds(list(enumerate(events)), "start"), _kinds(list(enumerate(events)), "end")
    assert len(starts) == 1 and len(ends) == 1
    assert ends[0][1].frames == 30 and ends[0][1].last_frame == 29
