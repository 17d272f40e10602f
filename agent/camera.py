"""Frames from a camera, video file or stream: a capture thread where the latest frame wins.

Inference never waits for capture and capture never queues behind inference (Frigate's
pattern): the thread keeps one slot, overwrites it, and counts frames nobody took as dropped.
A lost source is retried with capped exponential backoff and full jitter, reported once per
outage, and the agent keeps running meanwhile.

A video file with `realtime = false` is replayed instead: every frame is handed over, the
next one read while inference runs on the current one, none dropped and none paced.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy.typing as npt

from edgefleet.agent.config import CameraConfig

log = logging.getLogger(__name__)
EventSink = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class Frame:
    """One captured frame with its capture counter and time."""

    index: int
    ts: float
    image: npt.NDArray[Any]


@dataclass
class CameraStats:
    """Counters the telemetry window reports."""

    captured: int = 0
    dropped: int = 0
    reconnects: int = 0
    connected: bool = False
    last_error: str | None = None  # why the source was last lost (None once it delivers)


def backoff_delays(initial: float, cap: float, rng: random.Random) -> Any:
    """Full-jitter capped exponential backoff: uniform(0, min(cap, initial * 2**n))."""
    n = 0
    while True:
        yield rng.uniform(0, min(cap, initial * 2**n))
        n = min(n + 1, 30)


def describe_source(source: str | int) -> str:
    """A loggable name for the source, without credentials embedded in a URL."""
    text = str(source)
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return text


class Camera:
    """Owns the capture thread; `latest()` hands out the newest frame not yet taken."""

    def __init__(self, cfg: CameraConfig, on_event: EventSink | None = None) -> None:
        self.cfg = cfg
        self.on_event = on_event or (lambda kind, msg, details: None)
        self.stats = CameraStats()
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._taken = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)
        self._rng = random.Random()
        self.name = describe_source(cfg.source)
        # Replaying a file (realtime = false): every frame is handed over, one at a time.
        self._replay = not cfg.realtime

    def start(self) -> None:
        """Start capturing in the background."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and release the device."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    def latest(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame not handed out before; None if none arrives within timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._slot is None or self._slot.index == self._taken:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            frame = self._slot
            self._taken = frame.index
            if self._replay:
                self._cond.notify_all()  # the capture thread waits for this to read the next
            return frame

    # -- capture thread ------------------------------------------------------------------

    def _open(self) -> cv2.VideoCapture | None:
        source = self.cfg.source
        if isinstance(source, str) and source.isdigit():
            source = int(source)
        if isinstance(source, str) and "://" not in source and not Path(source).exists():
            self._lost(f"{self.name}: no such device or file")
            return None
        cap = cv2.VideoCapture(source)
        if not cap.isOpened():
            cap.release()
            self._lost(f"{self.name}: OpenCV cannot open it")
            return None
        if self.cfg.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
        if self.cfg.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
        if self.cfg.fps and isinstance(source, int):
            cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
        return cap

    def _is_file(self) -> bool:
        return self.cfg.kind == "file"

    def _lost(self, reason: str) -> None:
        self.stats.last_error = reason
        if self.stats.connected or self.stats.reconnects == 0:
            log.warning("camera %s lost: %s", self.name, reason)
            self.on_event("camera_lost", reason, {"source": self.name})
        self.stats.connected = False

    def _run(self) -> None:
        delays = backoff_delays(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s, self._rng)
        while not self._stop.is_set():
            cap = self._open()
            if cap is None:
                self.stats.reconnects += 1
                self._stop.wait(next(delays))
                continue
            if self.stats.reconnects:
                log.info("camera %s restored after %d attempt(s)", self.name, self.stats.reconnects)
                self.on_event(
                    "camera_restored", f"{self.name}: frames again", {"source": self.name}
                )
            self.stats.connected = True
            self.stats.last_error = None
            delays = backoff_delays(
                self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s, self._rng
            )
            try:
                self._capture(cap)
            finally:
                cap.release()
            if not self._stop.is_set():
                self._lost(f"{self.name}: stopped delivering frames")
                self.stats.reconnects += 1
                self._stop.wait(next(delays))

    def _capture(self, cap: cv2.VideoCapture) -> None:
        """Read until the source fails; files are paced to their frame rate and may loop."""
        is_file = self._is_file()
        fps = self.cfg.fps or (cap.get(cv2.CAP_PROP_FPS) if is_file else 0) or 0
        period = 1.0 / fps if is_file and fps > 0 else 0.0
        next_at = time.monotonic()
        while not self._stop.is_set():
            ok, image = cap.read()
            if not ok or image is None:
                if is_file and not Path(str(self.cfg.source)).exists():
                    return  # the file was removed: a lost source, even if still open here
                if is_file and self.cfg.loop and self.stats.captured > 0:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, image = cap.read()
                if not ok or image is None:
                    return
            self._publish(image)
            if self._replay:
                # Read the next frame only once this one was taken: it is decoded here while
                # inference runs on this one, and nothing is dropped.
                self._wait_taken(self.stats.captured)
            elif period:
                # A file plays at its own rate, as a camera would deliver it.
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_at = time.monotonic()

    def _wait_taken(self, index: int) -> None:
        with self._cond:
            while self._taken < index and not self._stop.is_set():
                self._cond.wait(0.5)

    def _publish(self, image: npt.NDArray[Any]) -> None:
        with self._cond:
            if self._slot is not None and self._slot.index != self._taken:
                self.stats.dropped += 1  # overwritten before inference took it
            self.stats.captured += 1
            self._slot = Frame(self.stats.captured, time.time(), image)
            self._cond.notify_all()
