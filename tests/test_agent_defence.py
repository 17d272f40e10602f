"""Defence in depth on the agent, as a real process against a real mosquitto (issue 12).

A repeated command id is answered from memory, never run twice; a retained command (stale on
the broker, or published retained) is never run, and reported; a full outbox is reported by
`outbox_overflow` events, and the dropped-window count in telemetry survives a restart.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.protocol import Event, TopicTree, decode
from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests.agent_harness import Collector, missing, reference_bundle

Setup = tuple[Path, Path, FleetKey, str, Collector]


@pytest.fixture
def setup(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Setup]:
    bundle, key = reference_bundle(tmp_path)
    root = f"{topic_prefix}/edgefleet/v1"
    collector = Collector(mqtt_broker, TopicTree(root))
    yield tmp_path, bundle, key, root, collector
    collector.close()


def _ping(cid: str) -> bytes:
    return json.dumps({"v": 1, "id": cid, "ts": time.time(), "command": {"name": "ping"}}).encode()


def _retained_reports(col: Collector) -> list[Event]:
    with col._lock:
        return [e for e in col.events if e.details.get("reason") == "retained_command"]


def test_repeated_ids_are_answered_from_memory_and_retained_commands_never_run(
    setup: Setup, mqtt_broker: MosquittoBroker
) -> None:
    tmp, bundle, key, root, col = setup
    cmd = TopicTree(root).device("pi-def", "cmd")
    # A stale command left retained on the broker before the agent ever connects.
    col.client.publish(cmd, _ping("c-stale"), qos=1, retain=True).wait_for_publish(5)
    cfg = write_config(
        tmp, device_id="pi-def", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key
    )
    with AgentProcess(cfg, tmp / "agent.log") as agent:
        assert col.wait(lambda c: len(c.telemetry) >= 1, 60), agent.tail()
        dup = _ping("c-dup")
        col.publish(cmd, dup)
        col.publish(cmd, dup)  # a QoS 1 redelivery, or a coordinator resending
        col.client.publish(cmd, _ping("c-live"), qos=1, retain=True).wait_for_publish(5)
        col.publish(cmd, _ping("c-after"))
        assert col.wait(
            lambda c: (
                [r.id for r in c.replies].count("c-dup") == 2
                and "c-after" in {r.id for r in c.replies}
                and len(_retained_reports(c)) == 2
            ),
            30,
        ), f"{col.replies}\n{col.events}\n{agent.tail()}"
        first, again = [r for r in col.replies if r.id == "c-dup"]
        # The same reply, not a second run: a second ping would carry a later pong and ts.
        assert again == first and first.ok
        stale, live = _retained_reports(col)
        assert "c-stale" in stale.message and "c-live" in live.message
        assert stale.details["topic"] == cmd and stale.level == "error"
        assert agent.terminate() == 0, agent.tail()
    # After a restart the retained command is delivered again, and still not run.
    with AgentProcess(cfg, tmp / "agent2.log") as agent:
        assert col.wait(lambda c: sum(e.kind == "started" for e in c.events) == 2, 60), agent.tail()
        col.publish(cmd, _ping("c-after-restart"))
        assert col.wait(
            lambda c: (
                "c-after-restart" in {r.id for r in c.replies} and len(_retained_reports(c)) == 3
            ),
            30,
        ), f"{col.events}\n{agent.tail()}"
        assert agent.terminate() == 0, agent.tail()
    answered = {r.id for r in col.replies}
    assert "c-stale" not in answered and "c-live" not in answered, col.replies
    assert "c-live" in _retained_reports(col)[-1].message  # the one the broker now keeps


def _outbox(state: Path) -> tuple[dict[str, int], list[Event]]:
    """A running agent's outbox, read beside it: its counters and its queued events."""
    db = state / "outbox.db"
    if not db.exists():
        return {}, []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        rows = conn.execute("SELECT payload FROM outbox WHERE kind = 'events'").fetchall()
    except sqlite3.OperationalError:  # opened while the agent was still creating it
        return {}, []
    finally:
        conn.close()
    events = [decode("events", bytes(r[0])) for r in rows]
    return meta, [e for e in events if isinstance(e, Event)]


def test_outbox_overflow_is_an_event_and_its_count_survives_a_restart(
    setup: Setup, mqtt_broker: MosquittoBroker
) -> None:
    tmp, bundle, key, root, col = setup
    cfg = write_config(
        tmp, device_id="pi-full", broker=mqtt_broker, topic_root=root, bundle=bundle, key=key,
        extra="[outbox]\nmax_messages = 10\n",
    )  # fmt: skip
    state = tmp / "state"
    mqtt_broker.stop()  # nothing can leave: the 10-message outbox fills and drops windows

    def overflowing() -> bool:
        meta, events = _outbox(state)
        reported = any(e.kind == "outbox_overflow" for e in events)
        return meta.get("overflow/telemetry", 0) >= 3 and reported

    with AgentProcess(cfg, tmp / "agent.log") as agent:
        wait_until(overflowing, 90, "3 windows dropped and reported", detail=agent.tail)
        assert agent.terminate() == 0, agent.tail()
    meta, _ = _outbox(state)
    dropped, produced = meta["overflow/telemetry"], meta["seq/telemetry"]
    mqtt_broker.start()
    with AgentProcess(cfg, tmp / "agent2.log") as agent:
        # The new process's windows still count the drops of the one before.
        assert col.wait(
            lambda c: any(t.seq >= produced and t.outbox_overflow >= dropped for t in c.telemetry),
            60,
        ), f"{[(t.seq, t.outbox_overflow) for t in col.telemetry]}\n{agent.tail()}"
        with col._lock:
            overflow = [e for e in col.events if e.kind == "outbox_overflow"]
        assert overflow and overflow[0].level == "warning", col.events
        first = overflow[0].details
        assert isinstance(first["total"], int) and first["total"] >= 1
        assert first["dropped"] == first["total"]  # the first report covers every drop so far
        # Every window up to the newest arrived or is covered by a reported drop. (At most
        # covered: a window evicted while its PUBLISH was in flight, right after the
        # reconnect, arrives and is counted as dropped too.) Every window the first agent
        # dropped, with the broker away, is missing for good.
        assert col.wait(
            lambda c: (
                dropped <= len(missing(c.seqs())) <= max(t.outbox_overflow for t in c.telemetry)
                and c.telemetry[-1].seq > produced
            ),
            30,
        ), f"missing {missing(col.seqs())} of {[(t.seq, t.outbox_overflow) for t in col.telemetry]}"
        assert agent.terminate() == 0, agent.tail()
