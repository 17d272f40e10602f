"""A frame the model cannot take is skipped and reported; the next good frame is inferred.

In-process Agent on the reference bundle (real onnxruntime, real outbox); the link is never
started, so the event is read back from the on-disk outbox it was queued in.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np

from agent.camera import Frame
from agent.config import load_config
from agent.protocol import Event, decode
from agent.service import Agent
from server.localbroker import MosquittoBroker
from server.reference import VIDEO_PATH
from tests.agent_harness import reference_bundle, write_config


def _events(agent: Agent) -> list[Event]:
    decoded = [decode("events", e.payload) for e in agent.outbox.peek(1000) if e.kind == "events"]
    return [e for e in decoded if isinstance(e, Event)]


def test_rejected_frames_are_counted_reported_once_and_inference_goes_on(
    tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    bundle, key = reference_bundle(tmp_path)
    cfg = write_config(
        tmp_path, device_id="pi-frames", broker=mqtt_broker, topic_root="t/edgefleet/v1",
        bundle=bundle, key=key,
    )  # fmt: skip
    agent = Agent(load_config(cfg), threading.Event())
    try:
        window = agent._new_window()
        cap = cv2.VideoCapture(str(VIDEO_PATH))
        good = cap.read()[1]
        cap.release()
        bad = np.zeros((96, 96, 2), np.uint8)  # two channels: no colour order fits
        for i, image in enumerate([good, bad, bad, bad, good, bad]):
            agent._infer(Frame(i, time.time(), image), window)
        assert window.processed == 2 and agent.frames_rejected == 4
        rejected = [e for e in _events(agent) if e.details.get("reason") == "frame_rejected"]
        # One report per run of bad frames (the good frame in between starts a new run).
        assert [e.details["frames_rejected"] for e in rejected] == [1, 4]
        assert "frame has 2 channels" in rejected[0].message and rejected[0].level == "error"
        assert agent.last_frame is not None and agent.last_frame.index == 4
    finally:
        agent.outbox.close()
