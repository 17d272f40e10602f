"""The Agent object in-process: rejected frames, operating points, bundle reloads.

Real bundles, real onnxruntime, a real on-disk outbox; the link is never started, so events
are read back from the outbox they were queued in. The agent as a process is tested in
test_agent_process.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgefleet.agent.bundle import OperatingPoint, generate_private_key, write_bundle
from edgefleet.agent.camera import Frame
from edgefleet.agent.config import load_config
from edgefleet.agent.protocol import Event, decode
from edgefleet.agent.service import Agent
from edgefleet.server.keystore import FleetKey, load_key
from edgefleet.server.local.agents import write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.reference import VIDEO_PATH
from tests.agent_harness import reference_bundle
from tests.bundle_helpers import two_stage_body, two_stage_files


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


StateAgent = tuple[Agent, Path, FleetKey]


@pytest.fixture
def two_stage_agent(tmp_path: Path, mqtt_broker: MosquittoBroker) -> Iterator[StateAgent]:
    """An Agent on the two-stage bundle (two operating points), its bundle dir and key."""
    _, ref_key = reference_bundle(tmp_path / "ref")  # a fleet key on disk
    key = load_key(ref_key.public_path.parent)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, two_stage_body(), two_stage_files(), key.private)
    cfg = write_config(
        tmp_path, device_id="pi-state", broker=mqtt_broker, topic_root="t/edgefleet/v1",
        bundle=bundle, key=key,
    )  # fmt: skip
    agent = Agent(load_config(cfg), threading.Event())
    try:
        yield agent, bundle, key
    finally:
        agent.outbox.close()


def test_coordinator_moves_are_events_and_a_bad_index_changes_nothing(
    two_stage_agent: StateAgent,
) -> None:
    agent, _, _ = two_stage_agent
    assert agent.operating_point == 0 and agent.model.thresholds == [0.95]
    agent.set_operating_point(1, pin=True)
    assert agent.model.thresholds == [0.6] and agent.governor.pinned
    with pytest.raises(ValueError, match="operating point 7 does not exist"):
        agent.set_operating_point(7, pin=False)
    assert agent.operating_point == 1 and agent.model.thresholds == [0.6]
    moves = [e for e in _events(agent) if e.kind == "operating_point_changed"]
    assert [(e.details["from"], e.details["to"], e.details["pinned"]) for e in moves] == [
        (0, 1, True)
    ]
    assert "pinned to 1 (fast) by the coordinator" in moves[0].message


def test_reload_to_a_bundle_with_fewer_points_rebuilds_the_governor(
    two_stage_agent: StateAgent,
) -> None:
    agent, bundle, key = two_stage_agent
    agent.set_operating_point(1, pin=True)
    one_point = two_stage_body(
        version=4, operating_points=[OperatingPoint(name="only", thresholds=[0.8])]
    )
    shutil.rmtree(bundle)
    write_bundle(bundle, one_point, two_stage_files(), key.private)
    assert agent.reload_bundle()["operating_point"] == 0
    assert agent.model.manifest.version == 4 and agent.model.thresholds == [0.8]
    assert agent.governor.n_points == 1 and agent.governor.pinned
    # A window that would make an unpinned governor step: nothing indexes past the end.
    agent.governor.unpin()
    assert agent.governor.update(p95_ms=1e6, temperature_c=99.0, throttled=True) is None


def test_a_bundle_signed_by_another_key_is_refused_and_the_old_one_keeps_running(
    two_stage_agent: StateAgent,
) -> None:
    agent, bundle, _ = two_stage_agent
    stranger = generate_private_key()
    shutil.rmtree(bundle)
    write_bundle(bundle, two_stage_body(version=9), two_stage_files(), stranger)
    with pytest.raises(RuntimeError, match="refusing to run"):
        agent.reload_bundle()
    assert agent.model.manifest.version == 3


def test_overflow_reports_resume_after_a_restart_where_they_left_off(
    tmp_path: Path, mqtt_broker: MosquittoBroker
) -> None:
    bundle, key = reference_bundle(tmp_path)
    cfg = write_config(
        tmp_path, device_id="pi-over", broker=mqtt_broker, topic_root="t/edgefleet/v1",
        bundle=bundle, key=key, extra="[outbox]\nmax_messages = 10\n",
    )  # fmt: skip

    def fill(agent: Agent, n: int) -> None:
        for i in range(n):
            agent.link.send("telemetry", f"w{i}".encode())

    def reports(agent: Agent) -> list[Event]:
        return [e for e in _events(agent) if e.kind == "outbox_overflow"]

    agent = Agent(load_config(cfg), threading.Event())
    try:
        fill(agent, 13)  # 3 windows dropped
        agent._report_overflow(0.0)
        fill(agent, 2)  # 2 more (the event itself took the place of a third)
        agent._report_overflow(1.0)  # within the minute: not reported yet
        assert [e.details["dropped"] for e in reports(agent)] == [3]
    finally:
        agent.outbox.close()
    agent = Agent(load_config(cfg), threading.Event())  # the killed agent's successor
    try:
        agent._report_overflow(0.0)
        report = reports(agent)[-1]
        # Only what the first process had not reported: its 2 drops and the one its event made.
        assert report.details["dropped"] == 3 and report.details["total"] == 6
        assert report.level == "warning"
    finally:
        agent.outbox.close()
