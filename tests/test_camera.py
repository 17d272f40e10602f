"""The capture thread on real video files: latest frame wins, drops counted, loss and recovery."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.camera import Camera, backoff_delays, describe_source
from edgefleet.agent.config import CameraConfig
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.reference import VIDEO_PATH


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, kind: str, message: str, details: dict[str, Any]) -> None:
        self.seen.append((kind, message))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.seen]


def test_frames_arrive_in_order_and_latest_wins() -> None:
    cam = Camera(CameraConfig(source=str(VIDEO_PATH), fps=200))
    cam.start()
    try:
        first = cam.latest(timeout=10)
        assert first is not None and first.image.shape == (96, 96, 3)
        # A slow consumer: ten frames are captured (and all but the last overwritten) meanwhile.
        wait_until(lambda: cam.stats.captured >= first.index + 10, 15, "ten more frames")
        second = cam.latest(timeout=5)
        assert second is not None and second.index > first.index + 5
        assert cam.stats.dropped >= second.index - first.index - 2
        assert cam.stats.captured >= second.index
    finally:
        cam.stop()


def test_a_frame_is_handed_out_once() -> None:
    cam = Camera(CameraConfig(source=str(VIDEO_PATH), fps=5))
    cam.start()
    try:
        a = cam.latest(timeout=10)
        b = cam.latest(timeout=10)
        assert a is not None and b is not None and b.index > a.index
    finally:
        cam.stop()


def test_replay_hands_over_every_frame_in_order_to_a_slow_consumer() -> None:
    cam = Camera(CameraConfig(source=str(VIDEO_PATH), realtime=False))
    cam.start()
    try:
        indices = []
        for k in range(40):
            frame = cam.latest(timeout=10)
            assert frame is not None
            indices.append(frame.index)
            if k % 10 == 0:
                # Deliberately slow (time must pass, there is nothing to wait for): a
                # real-time camera would drop frames meanwhile, a replay must not.
                time.sleep(0.2)
        assert indices == list(range(1, 41))
        assert cam.stats.dropped == 0
        assert cam.stats.captured <= 41  # at most the one being read ahead
    finally:
        cam.stop()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": 0}, "source 0 is a device, which delivers at its own rate"),
        ({"source": "/dev/video2"}, "is a device"),
        ({"source": "rtsp://cam.lan/stream"}, "is a url"),
        ({"source": "clip.mp4", "fps": 30}, "fps paces real-time playback"),
    ],
)
def test_replay_is_for_files_only(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CameraConfig(realtime=False, **fields)


def test_file_loops_when_asked(tmp_path: Path) -> None:
    cam = Camera(CameraConfig(source=str(VIDEO_PATH), loop=True, fps=1000))
    cam.start()
    try:
        # The video has 400 frames.
        wait_until(lambda: cam.stats.captured > 450, 15, "more frames than the video has")
        assert cam.stats.connected
    finally:
        cam.stop()


def test_missing_source_reports_once_retries_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "cam.avi"
    events = Events()
    cfg = CameraConfig(source=str(path), fps=100, reconnect_initial_s=0.05, reconnect_max_s=0.2)
    cam = Camera(cfg, on_event=events)
    cam.start()
    try:
        wait_until(lambda: cam.stats.reconnects >= 3, 15, "3 reconnect attempts")
        assert events.kinds() == ["camera_lost"]  # once per outage, not once per attempt
        assert "no such device or file" in events.seen[0][1]
        assert cam.latest(timeout=0.2) is None  # nothing to hand out; the agent goes on
        shutil.copy(VIDEO_PATH, path)
        assert cam.latest(timeout=10) is not None
        assert "camera_restored" in events.kinds()
    finally:
        cam.stop()


def test_unreadable_file_is_a_lost_source(tmp_path: Path) -> None:
    path = tmp_path / "garbage.avi"
    path.write_bytes(b"this is not a video" * 100)
    events = Events()
    cam = Camera(
        CameraConfig(source=str(path), reconnect_initial_s=0.05, reconnect_max_s=0.1), events
    )
    cam.start()
    try:
        wait_until(lambda: cam.stats.reconnects >= 2, 15, "2 reconnect attempts")
        assert events.kinds()[0] == "camera_lost"
    finally:
        cam.stop()


def test_source_ending_without_loop_is_lost_and_retried(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    shutil.copy(VIDEO_PATH, path)
    events = Events()
    cfg = CameraConfig(source=str(path), fps=1000, reconnect_initial_s=0.05, reconnect_max_s=0.1)
    cam = Camera(cfg, events)
    cam.start()
    try:
        wait_until(lambda: "camera_lost" in events.kinds(), 15, "a camera_lost event")
        assert "stopped delivering frames" in dict(events.seen)["camera_lost"]
        # The file is still there: the reconnect finds it.
        wait_until(lambda: "camera_restored" in events.kinds(), 15, "a camera_restored event")
    finally:
        cam.stop()


def test_backoff_is_capped_with_full_jitter() -> None:
    gen = backoff_delays(0.5, 4.0, random.Random(1))
    delays = [next(gen) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(delays[:1]) <= 0.5 and max(delays[10:]) > 1.0


@pytest.mark.parametrize(
    ("source", "shown"),
    [("rtsp://user:pw@cam.lan/stream", "rtsp://***@cam.lan/stream"), (0, "0")],
)
def test_source_names_hide_credentials(source: str | int, shown: str) -> None:
    assert describe_source(source) == shown
