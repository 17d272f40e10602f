"""The agent as a real process on a detect bundle and a video, against a real broker."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.protocol import TopicTree
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from tests.agent_harness import Collector

from .helpers import EMPTY_BEFORE, SQUARE_FRAMES, detect_bundle, square_video

TRACKER = "[detect.tracker]\nmin_hits = 3\nmax_missed = 5\n"


def test_square_video_gives_object_start_and_end_events(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    bundle, key = detect_bundle(tmp_path)
    video = square_video(tmp_path / "square.avi")
    root = f"{topic_prefix}/edgefleet/v1"
    col = Collector(mqtt_broker, TopicTree(root))
    cfg = write_config(
        tmp_path,
        device_id="cam-det",
        broker=mqtt_broker,
        topic_root=root,
        bundle=bundle,
        key=key,
        video=video,
        realtime=False,
        extra=TRACKER,
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:

        def ended_twice(c: Collector) -> bool:
            return sum(e.kind == "object_end" for e in c.events) >= 2

        assert col.wait(ended_twice, 90), agent.tail()
        assert col.wait(lambda c: any(t.objects_started for t in c.telemetry), 30), agent.tail()
    finally:
        assert agent.terminate() == 0, agent.output()
        col.close()
    objects = [e for e in col.events if e.kind.startswith("object_")]
    # One pass of the video: one square, one start then one end, same track, in order.
    first_end = next(i for i, e in enumerate(objects) if e.kind == "object_end")
    start, end = objects[0], objects[first_end]
    assert start.kind == "object_start" and start.details["track_id"] == end.details["track_id"]
    assert end.details["label"] == "square" and end.details["zone"] is None
    # The square is cell (1, 2): frame pixels x 32..48, y 16..32.
    box = [end.details[k] for k in ("x1", "y1", "x2", "y2")]
    assert all(abs(float(a) - b) <= 1.0 for a, b in zip(box, [32, 16, 48, 32], strict=True)), box
    # Matched on every frame of the square (JPEG edges aside): within a few frames.
    assert abs(int(end.details["frames"]) - SQUARE_FRAMES) <= 3, end.details  # type: ignore[arg-type]
    # Frame numbers are the camera's counter (from 1; every frame handed over, no gate):
    # start on the 3rd (min_hits) frame of the track, end on the 5th (max_missed) without.
    first, last = (int(end.details[k]) for k in ("first_frame", "last_frame"))  # type: ignore[arg-type]
    assert start.details["first_frame"] == first and abs(first - (EMPTY_BEFORE + 1)) <= 2
    assert start.details["frame"] == first + 2 and end.details["frame"] == last + 5
    assert abs(last - (EMPTY_BEFORE + SQUARE_FRAMES)) <= 2, end.details
    assert "last_frame" not in start.details
    windows = [t for t in col.telemetry if t.frames_processed]
    assert windows and all(t.exit_histogram == [t.frames_processed] for t in windows)
    assert all(t.frames_skipped == 0 for t in windows)  # no gate at the default point
    assert any((t.object_counts or {}).get("square") == 1 for t in windows)
