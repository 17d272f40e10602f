"""Simulated devices' MQTT sessions against a real mosquitto.

Births, telemetry, wills, the backlog, broker restarts and commands, seen by a paho subscriber.
"""

from __future__ import annotations

import itertools
import time

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.protocol import (
    UNCORRELATED_ID,
    Command,
    Event,
    Ping,
    Reply,
    SetOperatingPoint,
    Status,
    Telemetry,
    TopicTree,
    decode,
    encode,
)
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.local.broker import MosquittoBroker
from tests.simulate.helpers import (
    Collector,
    all_seqs_received,
    missing,
    start,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def test_births_and_contiguous_telemetry(
    mqtt_broker: MosquittoBroker, topic_prefix: str, collector: Collector, sims: list[Simulator]
) -> None:
    cfg = SimConfig(
        mqtt_broker.host, mqtt_broker.port, devices=20, rate=5, root=topic_prefix, events_every=4
    )
    sim = start(sims, cfg)
    assert sim.device_ids() == [f"sim-{i:05d}" for i in range(20)]
    wait_for(
        "5 windows from every device",
        lambda: min(d.next_seq for d in sim.stats().devices) >= 5,
    )
    sim.pause()
    assert sim.wait_drained(10)
    collector.wait_for("every window", lambda: all_seqs_received(collector, sim))
    assert collector.errors == []

    stats = sim.stats()
    births = [s for s in collector.of(Status) if s.online]
    assert {b.device_id for b in births} == set(sim.device_ids())
    assert len({b.boot_id for b in births}) == 20  # one simulated agent start each
    for dev in sim.device_ids():
        s = stats.by_id()[dev]
        assert s.next_seq >= 5 and s.acked == s.next_seq and s.backlog == 0 and s.online
        # No outage: each seq exactly once, in order, from 0.
        assert collector.seqs(dev) == list(range(s.next_seq))
        windows: list[Telemetry] = collector.of(Telemetry, dev)
        for prev, cur in itertools.pairwise(windows):
            assert cur.window_start == pytest.approx(prev.window_end)
            # Its length is wall time on a loaded machine: only its sign is the simulator's.
            assert cur.window_end > cur.window_start
        for t in windows:
            assert t.power_source == "estimate"
            assert t.latency_ms.p50 <= t.latency_ms.p95 <= t.latency_ms.p99
            assert sum(t.exit_histogram) == t.frames_processed
        events: list[Event] = collector.of(Event, dev)
        assert [e.seq for e in events] == list(range(s.events)) and s.events >= 1

    sim.stop(graceful=True)  # offline statuses, DISCONNECT: no wills
    collector.wait_for(
        "the offline statuses",
        lambda: (
            {s.device_id for s in collector.of(Status) if not s.online} == set(sim.device_ids())
        ),
    )
    assert sim.stats().online == 0


def test_take_offline_fires_will_and_replays(
    mqtt_broker: MosquittoBroker, topic_prefix: str, collector: Collector, sims: list[Simulator]
) -> None:
    cfg = SimConfig(mqtt_broker.host, mqtt_broker.port, devices=6, rate=5, root=topic_prefix)
    sim = start(sims, cfg)
    away = ["sim-00001", "sim-00004"]
    wait_for(
        "windows acknowledged before the outage",
        lambda: all(sim.stats().by_id()[d].acked >= 2 for d in away),
    )
    sim.take_offline(away)

    def offline(dev: str) -> list[Status]:
        return [s for s in collector.of(Status, dev) if not s.online]

    collector.wait_for("the wills", lambda: all(offline(d) for d in away), timeout=5)
    birth = next(s for s in collector.of(Status, away[0]) if s.online)
    # The will is the birth of that connection with online=False.
    assert offline(away[0])[0] == birth.model_copy(update={"online": False})
    assert not any(offline(d) for d in sim.device_ids() if d not in away)

    before = sim.stats().by_id()
    wait_for(
        "5 windows each into the backlog",
        lambda: all(sim.stats().by_id()[d].next_seq >= before[d].next_seq + 5 for d in away),
    )
    during = sim.stats().by_id()
    for dev in away:
        assert not during[dev].online
        assert during[dev].next_seq > before[dev].next_seq
        assert during[dev].backlog >= during[dev].next_seq - before[dev].next_seq - 1

    sim.bring_online(away)
    collector.wait_for(
        "births again",
        lambda: all(len([s for s in collector.of(Status, d) if s.online]) >= 2 for d in away),
    )
    sim.pause()
    assert sim.wait_drained(10)
    collector.wait_for("the replayed windows", lambda: all_seqs_received(collector, sim))
    stats = sim.stats().by_id()
    for dev in away:
        assert stats[dev].online and stats[dev].connects == 2
        seqs = collector.seqs(dev)
        assert sorted(set(seqs)) == list(range(stats[dev].next_seq))
        # Replay is in order: the first arrival of each seq is increasing.
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == sorted(first_seen)

    wills_before = len([s for s in collector.of(Status) if not s.online])
    sim.stop(graceful=False)  # sockets dropped: every device's will fires
    collector.wait_for(
        "every will",
        lambda: len([s for s in collector.of(Status) if not s.online]) == wills_before + 6,
    )


def test_full_backlog_drops_oldest_and_counts(
    mqtt_broker: MosquittoBroker, topic_prefix: str, collector: Collector, sims: list[Simulator]
) -> None:
    cfg = SimConfig(
        mqtt_broker.host,
        mqtt_broker.port,
        devices=2,
        rate=5,
        root=topic_prefix,
        events_every=0,
        backlog_limit=5,
    )
    sim = start(sims, cfg)
    dev = "sim-00000"
    sim.pause()
    assert sim.wait_drained(5)
    base = sim.stats().by_id()[dev]
    sim.take_offline([dev])
    sim.produce_now(12, [dev])  # paused: exactly these windows, all into the backlog
    offline = sim.stats().by_id()[dev]
    assert offline.next_seq == base.next_seq + 12
    assert (offline.backlog, offline.overflow) == (5, 7)

    sim.bring_online([dev])
    assert sim.wait_drained(10)
    last = base.next_seq + 11
    collector.wait_for("the kept windows", lambda: last in collector.seqs(dev))
    kept = [t for t in collector.of(Telemetry, dev) if t.seq > base.next_seq + 6]
    assert sorted({t.seq for t in kept}) == list(range(base.next_seq + 7, last + 1))
    newest = next(t for t in kept if t.seq == last)
    assert (newest.outbox_depth, newest.outbox_overflow) == (5, 6)  # as it was when produced
    final = sim.stats().by_id()[dev]
    assert final.acked == final.next_seq - final.overflow


def test_broker_restart_loses_nothing(
    mqtt_broker: MosquittoBroker, topic_prefix: str, collector: Collector, sims: list[Simulator]
) -> None:
    cfg = SimConfig(mqtt_broker.host, mqtt_broker.port, devices=20, rate=5, root=topic_prefix)
    sim = start(sims, cfg)
    wait_for("windows acknowledged", lambda: min(d.acked for d in sim.stats().devices) >= 3)
    mqtt_broker.stop()
    at_stop = sim.stats().by_id()
    # Long enough offline that every device queues windows and its reconnects are refused.
    wait_for(
        "every device offline with 5 more windows",
        lambda: (
            (now := sim.stats()).online == 0
            and all(d.next_seq >= at_stop[d.device_id].next_seq + 5 for d in now.devices)
        ),
    )
    during = sim.stats()
    assert during.online == 0 and during.backlog > 0
    mqtt_broker.start()
    wait_for("every device reconnected", lambda: sim.stats().online == 20, timeout=15)
    back = sim.stats().by_id()
    wait_for(
        "live windows after the reconnect",
        lambda: all(d.next_seq >= back[d.device_id].next_seq + 2 for d in sim.stats().devices),
    )
    sim.pause()
    assert sim.wait_drained(15)
    collector.wait_for("every seq", lambda: all_seqs_received(collector, sim), timeout=15)
    assert missing(collector, sim) == {}
    stats = sim.stats()
    assert stats.overflow == 0 and stats.acked == stats.produced
    assert all(d.connects >= 2 for d in stats.devices)
    assert collector.errors == []


def test_commands_get_replies(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    collector: Collector,
    sims: list[Simulator],
    publisher: mqtt.Client,
) -> None:
    cfg = SimConfig(
        mqtt_broker.host, mqtt_broker.port, devices=3, rate=5, root=topic_prefix, group="line-1"
    )
    sim = start(sims, cfg)
    tree = TopicTree(topic_prefix)
    target = "sim-00002"

    def send(payload: bytes, topic: str = tree.device(target, "cmd")) -> None:
        publisher.publish(topic, payload, qos=1).wait_for_publish(5)

    def reply(cid: str) -> Reply:
        collector.wait_for(f"reply {cid}", lambda: any(r.id == cid for r in replies()))
        return next(r for r in replies() if r.id == cid)

    def replies() -> list[Reply]:
        return collector.of(Reply)

    send(encode(Command(id="ping-1", ts=time.time(), command=Ping())))
    ok = reply("ping-1")
    assert ok.ok and ok.device_id == target and ok.error is None

    send(encode(Command(id="op-1", ts=time.time(), command=SetOperatingPoint(index=3, pin=True))))
    assert reply("op-1").ok
    n_before = len(collector.of(Telemetry, target))
    collector.wait_for(
        "a window after the reply", lambda: len(collector.of(Telemetry, target)) > n_before
    )
    assert all(t.operating_point == 3 for t in collector.of(Telemetry, target)[n_before:])

    send(encode(Command(id="op-2", ts=time.time(), command=SetOperatingPoint(index=9))))
    bad = reply("op-2")
    assert not bad.ok and bad.error is not None and "does not exist" in bad.error

    send(b'{"v": 1, "id": "x-1", "ts": 1.0, "command": {"name": "self_destruct"}}')
    unknown = reply("x-1")
    assert not unknown.ok and unknown.error

    send(encode(Command(id="old-1", ts=1.0, expires_at=2.0, command=Ping())))
    assert not reply("old-1").ok

    # No correlation id to answer: logged, counted, refused under the uncorrelated id.
    send(b"not json at all")
    collector.wait_for("the rejection", lambda: sim.stats().by_id()[target].commands_rejected == 1)
    refused = reply(UNCORRELATED_ID)
    assert not refused.ok and "payload is not JSON" in (refused.error or "")

    # A retained command (stale, or published retained by anyone) is never run, as by the agent.
    publisher.publish(
        tree.device(target, "cmd"),
        encode(Command(id="kept-1", ts=time.time(), command=Ping())),
        qos=1,
        retain=True,
    ).wait_for_publish(5)
    send(encode(Command(id="after-kept", ts=time.time(), command=Ping())))
    assert reply("after-kept").ok
    assert not any(r.id == "kept-1" for r in replies())

    send(encode(Command(id="grp-1", ts=time.time(), command=Ping())), tree.group_cmd("line-1"))
    collector.wait_for(
        "a reply from every group member",
        lambda: {r.device_id for r in replies() if r.id == "grp-1"} == set(sim.device_ids()),
    )
    assert sim.stats().by_id()[target].commands == 7
    assert all(decode(Reply, encode(r)) == r for r in replies())


