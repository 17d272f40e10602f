"""The agent as a real process on the reference video, against a real broker."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests.agent_harness import Collector, missing, queued, reference_bundle

# Telemetry windows the agent produces while the broker is down in the outage test: with
# 1 s windows, an outage of well over the 5 s keepalive and several reconnect attempts.
OUTAGE_WINDOWS = 17
# systemd SIGKILLs an agent TimeoutStopSec=10 after SIGTERM (systemd/edgefleet-agent.service);
# the agent plans to be done within 4 s, so this bound only catches a hang.
STOP_TIMEOUT_S = 10.0


@pytest.fixture
def setup(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str):  # type: ignore[no-untyped-def]
    bundle, key = reference_bundle(tmp_path)
    root = f"{topic_prefix}/edgefleet/v1"
    collector = Collector(mqtt_broker, TopicTree(root))
    yield tmp_path, bundle, key, root, collector
    collector.close()


def test_telemetry_survives_a_long_broker_outage(setup, mqtt_broker: MosquittoBroker) -> None:  # type: ignore[no-untyped-def]
    tmp, bundle, key, root, col = setup
    cfg = write_config(
        tmp, device_id="pi-outage", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    agent = AgentProcess(cfg, tmp / "agent.log")
    try:
        assert col.wait(lambda c: len(c.telemetry) >= 3, 60), agent.output()
        mqtt_broker.stop()
        before = max(col.seqs())
        wait_until(
            lambda: queued(tmp / "state", "telemetry") >= OUTAGE_WINDOWS,
            60,
            f"{OUTAGE_WINDOWS} telemetry windows in the outbox while the broker is down",
            detail=agent.tail,
        )
        assert agent.alive(), agent.output()  # it kept inferring while the broker was gone
        mqtt_broker.start()
        # Windows produced during the outage arrive after reconnect, none missing.
        last = before + OUTAGE_WINDOWS
        assert col.wait(lambda c: max(c.seqs()) >= last and not missing(c.seqs()), 60), (
            f"missing {missing(col.seqs())} of {sorted(set(col.seqs()))}\n{agent.tail()}"
        )
        outage = [t for t in col.telemetry if before < t.seq <= last]
        assert len({t.seq for t in outage}) == OUTAGE_WINDOWS
        assert all(t.frames_processed > 0 for t in outage)
        assert any(t.outbox_depth > 0 for t in col.telemetry)  # the backlog was reported
    finally:
        assert agent.terminate() == 0, agent.output()
    assert col.status and col.status[-1].online is False  # clean stop publishes offline


def test_sigterm_while_offline_ends_in_time_with_everything_on_disk(
    setup, mqtt_broker: MosquittoBroker
) -> None:  # type: ignore[no-untyped-def]
    """The worst case for a clean stop: the broker is gone, so nothing can be delivered."""
    from edgefleet.agent.outbox import Outbox
    from edgefleet.agent.protocol import Event, Telemetry, decode

    tmp, bundle, key, root, col = setup
    cfg = write_config(
        tmp, device_id="pi-term", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    agent = AgentProcess(cfg, tmp / "agent.log")
    with agent:
        assert col.wait(lambda c: len(c.telemetry) >= 2, 60), agent.tail()  # connected
        mqtt_broker.stop()
        wait_until(
            lambda: queued(tmp / "state", "telemetry") >= 2,
            60,
            "telemetry windows piling up in the outbox",
            detail=agent.tail,
        )
        # Raises (and kills it) if the agent is still stopping when systemd would kill it.
        assert agent.terminate(STOP_TIMEOUT_S) == 0, agent.tail()
    with Outbox(tmp / "state" / "outbox.db") as outbox:
        kept = [decode(e.kind, e.payload) for e in outbox.peek(1000)]  # type: ignore[arg-type]
    windows = [m for m in kept if isinstance(m, Telemetry)]
    events = [m for m in kept if isinstance(m, Event)]
    assert len(windows) >= 2 and [w.seq for w in windows] == sorted(w.seq for w in windows)
    assert events and events[-1].kind == "stopping"


def test_backlog_survives_sigkill_and_is_replayed_in_order(
    setup, mqtt_broker: MosquittoBroker
) -> None:  # type: ignore[no-untyped-def]
    tmp, bundle, key, root, col = setup
    cfg = write_config(
        tmp, device_id="pi-kill", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    mqtt_broker.stop()
    agent = AgentProcess(cfg, tmp / "agent.log")
    with agent:
        wait_until(
            lambda: queued(tmp / "state", "telemetry") >= 5,
            60,
            "5 telemetry windows in the outbox only",
            detail=agent.tail,
        )
        assert agent.alive(), agent.output()
        agent.kill()
    mqtt_broker.start()
    agent = AgentProcess(cfg, tmp / "agent2.log")
    try:
        assert col.wait(lambda c: len(c.seqs()) >= 8 and not missing(c.seqs()), 60), (
            f"{col.seqs()}\n{agent.output()[-3000:]}"
        )
        first = col.seqs()[:5]
        assert first == sorted(first) and first[0] == 0  # the backlog comes first, in order
    finally:
        agent.terminate()


def test_malformed_commands_get_error_replies_and_inference_goes_on(
    setup, mqtt_broker: MosquittoBroker
) -> None:  # type: ignore[no-untyped-def]
    tmp, bundle, key, root, col = setup
    cfg = write_config(
        tmp, device_id="pi-cmd", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    agent = AgentProcess(cfg, tmp / "agent.log")
    tree = TopicTree(root)
    cmd_topic = tree.device("pi-cmd", "cmd")
    try:
        assert col.wait(lambda c: len(c.telemetry) >= 1, 60), agent.output()
        now = time.time()
        col.publish(cmd_topic, b"not json at all")
        col.publish(
            cmd_topic,
            json.dumps(
                {"v": 1, "id": "c-types", "ts": "yesterday", "command": {"name": "ping"}}
            ).encode(),
        )
        col.publish(
            cmd_topic,
            json.dumps(
                {"v": 1, "id": "c-unknown", "ts": now, "command": {"name": "self_destruct"}}
            ).encode(),
        )
        col.publish(
            cmd_topic,
            json.dumps(
                {"v": 1, "id": "c-big", "ts": now, "command": {"name": "ping"}, "pad": "x" * 20000}
            ).encode(),
        )
        col.publish(
            cmd_topic,
            json.dumps(
                {
                    "v": 1,
                    "id": "c-op",
                    "ts": now,
                    "command": {"name": "set_operating_point", "index": 5},
                }
            ).encode(),
        )
        col.publish(
            cmd_topic,
            json.dumps({"v": 1, "id": "c-ping", "ts": now, "command": {"name": "ping"}}).encode(),
        )
        col.publish(
            cmd_topic,
            json.dumps(
                {"v": 1, "id": "c-snap", "ts": now, "command": {"name": "snapshot", "quality": 50}}
            ).encode(),
        )
        assert col.wait(
            lambda c: (
                {"-", "c-types", "c-unknown", "c-big", "c-op", "c-ping", "c-snap"}
                <= {r.id for r in c.replies}
            ),
            30,
        ), f"{col.replies}\n{agent.output()[-3000:]}"
        replies = {r.id: r for r in col.replies}
        # Not JSON: no id to answer under, so the uncorrelated id "-" carries the refusal.
        assert not replies["-"].ok and "payload is not JSON" in (replies["-"].error or "")
        # Oversized: not parsed, but its id is read from the first bytes and answered.
        assert not replies["c-big"].ok and "over the 16384-byte limit" in (
            replies["c-big"].error or ""
        )
        assert not replies["c-types"].ok and "ts" in (replies["c-types"].error or "")
        assert not replies["c-unknown"].ok and "self_destruct" in (replies["c-unknown"].error or "")
        assert not replies["c-op"].ok and "no operating points" in (replies["c-op"].error or "")
        assert replies["c-ping"].ok and replies["c-snap"].ok
        assert replies["c-snap"].result and int(replies["c-snap"].result["bytes"]) > 100  # type: ignore[call-overload]
        n = len(col.telemetry)
        assert col.wait(
            lambda c: len(c.telemetry) >= n + 2 and c.telemetry[-1].frames_processed > 0, 30
        )
        assert agent.alive()
    finally:
        assert agent.terminate() == 0


def test_video_source_removed_then_back(setup, mqtt_broker: MosquittoBroker) -> None:  # type: ignore[no-untyped-def]
    tmp, bundle, key, root, col = setup
    video = tmp / "cam.avi"
    shutil.copy(Path(__file__).parents[1] / "server" / "reference" / "digits.avi", video)
    cfg = write_config(
        tmp,
        device_id="pi-cam",
        broker=mqtt_broker,
        topic_root=root,
        bundle=bundle,
        key=key,
        video=video,
    )
    agent = AgentProcess(cfg, tmp / "agent.log")
    try:
        assert col.wait(lambda c: len(c.telemetry) >= 1, 60), agent.output()
        video.unlink()  # the open capture keeps its file; a reconnect needs it
        assert col.wait(lambda c: any(e.kind == "camera_lost" for e in c.events), 60), (
            agent.output()[-3000:]
        )
        assert agent.alive()
        shutil.copy(Path(__file__).parents[1] / "server" / "reference" / "digits.avi", video)
        assert col.wait(lambda c: any(e.kind == "camera_restored" for e in c.events), 60), (
            agent.output()[-3000:]
        )
        n = len(col.telemetry)
        assert col.wait(lambda c: len(c.telemetry) > n and c.telemetry[-1].frames_processed > 0, 30)
    finally:
        assert agent.terminate() == 0


def test_second_agent_with_the_same_id_refuses_to_start(
    setup, mqtt_broker: MosquittoBroker
) -> None:  # type: ignore[no-untyped-def]
    tmp, bundle, key, root, col = setup
    cfg = write_config(
        tmp, device_id="pi-twin", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    first = AgentProcess(cfg, tmp / "a1.log")
    try:
        assert col.wait(lambda c: len(c.telemetry) >= 1, 60), first.output()
        second = AgentProcess(cfg, tmp / "a2.log")
        assert second.proc.wait(30) == 3
        assert "another edgefleet-agent runs as device pi-twin" in second.output()
    finally:
        first.terminate()


def test_unsigned_bundle_is_never_run(setup, mqtt_broker: MosquittoBroker) -> None:  # type: ignore[no-untyped-def]
    tmp, bundle, key, root, _col = setup
    (bundle / "manifest.sig").unlink()
    cfg = write_config(
        tmp, device_id="pi-unsigned", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    agent = AgentProcess(cfg, tmp / "agent.log")
    assert agent.proc.wait(60) == 2
    assert "refusing to run" in agent.output() and "unsigned bundles are refused" in agent.output()
