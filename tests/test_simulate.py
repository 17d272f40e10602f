"""The fleet simulator against a real mosquitto, observed by a real paho subscriber."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.protocol import (
    UNCORRELATED_ID,
    Command,
    Event,
    Message,
    Ping,
    ProtocolError,
    Reply,
    SetOperatingPoint,
    Status,
    Telemetry,
    TopicTree,
    decode,
    decode_topic,
    encode,
)
from edgefleet.server.fleet.simulate import SimConfig, Simulator, run_simulation
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Received:
    """One message as the subscriber saw it, decoded."""

    topic: str
    msg: Message
    retained: bool
    at: float


class Collector:
    """A paho subscriber with a persistent session (survives a broker restart) that decodes all."""

    def __init__(self, broker: MosquittoBroker, root: str) -> None:
        self.tree = TopicTree(root)
        self.received: list[Received] = []
        self.errors: list[ProtocolError] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 300  # the broker queues QoS 1 for us while we are away
        # clean_start=False from the first connect, like tests/agent_harness.py: mosquitto
        # then persists the session across its restart.
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector did not subscribe"

    def _on_connect(
        self, client: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode, _p: Any
    ) -> None:
        if not flags.session_present:
            client.subscribe(
                [(self.tree.all_devices(kind), 1) for kind in ("status", "telemetry", "events")]
                + [(self.tree.all_devices("reply"), 1)]
            )

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, m.topic, m.payload)
        with self._lock:
            if isinstance(decoded, ProtocolError):
                self.errors.append(decoded)
            else:
                self.received.append(Received(m.topic, decoded, bool(m.retain), time.monotonic()))

    def describe(self) -> str:
        """Per device, how many windows arrived and the highest seq, for failure messages."""
        seen: dict[str, list[int]] = {}
        for t in self.of(Telemetry):
            seen.setdefault(t.device_id, []).append(t.seq)
        return ", ".join(f"{d}: {len(s)} max {max(s)}" for d, s in sorted(seen.items()))

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> list[Received]:
        """Everything received so far."""
        with self._lock:
            return list(self.received)

    def of(self, kind: type[Any], device: str | None = None) -> list[Any]:
        """Decoded messages of one model (and device), in arrival order."""
        return [
            r.msg
            for r in self.snapshot()
            if isinstance(r.msg, kind) and (device is None or _device(r.msg) == device)
        ]

    def seqs(self, device: str) -> list[int]:
        """Telemetry seqs of one device in arrival order."""
        return [t.seq for t in self.of(Telemetry, device)]

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll cond until true; fail naming what was awaited and what arrived."""
        wait_until(
            cond,
            timeout,
            what,
            poll=0.05,
            detail=lambda: f"decode errors: {self.errors[:3]}; {self.describe()}",
        )


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll cond until true; fail naming what was awaited (tests without a collector)."""
    wait_until(cond, timeout, what, poll=0.05)


def _device(msg: Message) -> str | None:
    return getattr(msg, "device_id", None)


@pytest.fixture
def collector(mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Collector]:
    c = Collector(mqtt_broker, topic_prefix)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sims() -> Iterator[list[Simulator]]:
    """Simulators a test started; stopped (hard) afterwards whatever happened."""
    started: list[Simulator] = []
    yield started
    for sim in started:
        sim.stop(graceful=False)


@pytest.fixture
def publisher(mqtt_broker: MosquittoBroker) -> Iterator[mqtt.Client]:
    """A plain client that publishes commands, as the coordinator would."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    yield pub
    pub.disconnect()
    pub.loop_stop()


def _start(sims: list[Simulator], cfg: SimConfig) -> Simulator:
    sim = Simulator(cfg)
    sims.append(sim)
    sim.start()
    return sim


def _missing(c: Collector, sim: Simulator) -> dict[str, list[int]]:
    """Seqs each device produced that the collector has not received."""
    stats = sim.stats().by_id()
    gaps = {d: sorted(set(range(s.next_seq)) - set(c.seqs(d))) for d, s in stats.items()}
    return {d: g for d, g in gaps.items() if g}


def _all_seqs_received(c: Collector, sim: Simulator) -> bool:
    return not _missing(c, sim)


def test_births_and_contiguous_telemetry(
    mqtt_broker: MosquittoBroker, topic_prefix: str, collector: Collector, sims: list[Simulator]
) -> None:
    cfg = SimConfig(
        mqtt_broker.host, mqtt_broker.port, devices=20, rate=5, root=topic_prefix, events_every=4
    )
    sim = _start(sims, cfg)
    assert sim.device_ids() == [f"sim-{i:05d}" for i in range(20)]
    wait_for(
        "5 windows from every device",
        lambda: min(d.next_seq for d in sim.stats().devices) >= 5,
    )
    sim.pause()
    assert sim.wait_drained(10)
    collector.wait_for("every window", lambda: _all_seqs_received(collector, sim))
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
    sim = _start(sims, cfg)
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
    collector.wait_for("the replayed windows", lambda: _all_seqs_received(collector, sim))
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
    sim = _start(sims, cfg)
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
    sim = _start(sims, cfg)
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
    collector.wait_for("every seq", lambda: _all_seqs_received(collector, sim), timeout=15)
    assert _missing(collector, sim) == {}
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
    sim = _start(sims, cfg)
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

    send(encode(Command(id="grp-1", ts=time.time(), command=Ping())), tree.group_cmd("line-1"))
    collector.wait_for(
        "a reply from every group member",
        lambda: {r.device_id for r in replies() if r.id == "grp-1"} == set(sim.device_ids()),
    )
    assert sim.stats().by_id()[target].commands == 6
    assert all(decode(Reply, encode(r)) == r for r in replies())


def test_operating_points_run_from_accurate_to_fast(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    collector: Collector,
    sims: list[Simulator],
    publisher: mqtt.Client,
) -> None:
    """Point 0 is the most accurate and slowest, the last the fastest, as in docs/bundle.md."""
    points = 4
    cfg = SimConfig(
        mqtt_broker.host,
        mqtt_broker.port,
        devices=points,
        rate=4,
        root=topic_prefix,
        events_every=0,  # no governor: each device stays at the point it is pinned to
    )
    sim = _start(sims, cfg)
    tree = TopicTree(topic_prefix)
    ids = sim.device_ids()
    for k, dev in enumerate(ids):  # device k runs point k
        cmd = Command(id=f"op-{k}", ts=time.time(), command=SetOperatingPoint(index=k, pin=True))
        publisher.publish(tree.device(dev, "cmd"), encode(cmd), qos=1).wait_for_publish(5)
    collector.wait_for(
        "the pins' replies",
        lambda: {r.id for r in collector.of(Reply) if r.ok} >= {f"op-{k}" for k in range(points)},
    )

    def at(k: int) -> list[Telemetry]:
        # seq 0 is the short window the spread start gives; skip it.
        return [
            t
            for t in collector.of(Telemetry, ids[k])
            if t.operating_point == k and t.seq > 0 and t.frames_processed > 0
        ]

    collector.wait_for(
        "8 windows at every point", lambda: all(len(at(k)) >= 8 for k in range(points))
    )
    windows = [at(k) for k in range(points)]
    for k in range(points - 1):  # every window of a faster point has a lower median latency
        slower = min(t.latency_ms.p50 for t in windows[k])
        faster = max(t.latency_ms.p50 for t in windows[k + 1])
        assert faster < slower, f"point {k + 1} p50 {faster:.1f} ms >= point {k} {slower:.1f} ms"

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    accurate, fast = windows[0], windows[-1]
    assert mean([t.fps for t in accurate]) < mean([t.fps for t in fast])
    early = [mean([t.exit_histogram[0] / t.frames_processed for t in w]) for w in (accurate, fast)]
    assert early[0] < early[1]  # a fast point lets more frames leave at the first exit
    power = [mean([t.power_w or 0.0 for t in w]) for w in (accurate, fast)]
    assert power[0] > power[1]


def test_governor_moves_like_the_agent(
    mqtt_broker: MosquittoBroker, topic_prefix: str, collector: Collector, sims: list[Simulator]
) -> None:
    """One point faster under pressure, back toward the default when calm, never past it."""
    cfg = SimConfig(
        mqtt_broker.host, mqtt_broker.port, devices=3, rate=5, root=topic_prefix, events_every=1
    )
    sim = _start(sims, cfg)
    sim.pause()
    sim.produce_now(30)  # a governor step with every window
    assert sim.wait_drained(10)
    counts = {d.device_id: d.events for d in sim.stats().devices}
    collector.wait_for(
        "every move",
        lambda: all(len(collector.of(Event, d)) == n for d, n in counts.items()),
    )
    fastest = 3
    for dev in sim.device_ids():
        default = next(s for s in collector.of(Status, dev) if s.online).operating_point
        assert default < fastest  # room to speed up under pressure
        moves = [e for e in collector.of(Event, dev) if e.kind == "operating_point_changed"]
        assert len(moves) >= 30
        current = default
        for e in moves:
            src, dst = e.details["from"], e.details["to"]
            assert src == current and default <= dst <= fastest, (dev, default, e.details)
            if dst == src + 1:
                assert "pressure" in e.details["reason"]
            else:
                assert dst == src - 1 and "recovery" in e.details["reason"], e.details
            current = dst


def test_cli_prints_json(mqtt_broker: MosquittoBroker, topic_prefix: str) -> None:
    exe = REPO / ".venv" / "bin" / "edgefleet"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgefleet.server.cli"]
    proc = subprocess.run(
        [
            *cmd,
            "simulate",
            "--devices",
            "5",
            "--rate",
            "2",
            "--duration",
            "2",
            "--host",
            mqtt_broker.host,
            "--port",
            str(mqtt_broker.port),
            "--root",
            topic_prefix,
            "--progress-every",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["devices"] == 5 and report["produced"] > 0
    assert report["acked"] == report["produced"] and report["drained"] is True
    assert "produced" in proc.stderr  # progress lines


def test_300_devices_one_loop_thread(
    mqtt_broker: MosquittoBroker, topic_prefix: str, sims: list[Simulator]
) -> None:
    threads_before = threading.active_count()
    cfg = SimConfig(mqtt_broker.host, mqtt_broker.port, devices=300, rate=1, root=topic_prefix)
    sim = _start(sims, cfg)
    assert threading.active_count() == threads_before + 1  # one loop thread for 300 clients
    assert sim.stats().online == 300
    wait_for("600 windows", lambda: sim.stats().produced >= 600, timeout=15)
    sim.pause()
    assert sim.wait_drained(10)
    stats = sim.stats()
    assert stats.produced >= 600 and stats.acked == stats.produced
    sim.stop()
    assert sim.stats().online == 0


def test_run_simulation_processes_and_loss_burst(
    mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    cfg = SimConfig(mqtt_broker.host, mqtt_broker.port, devices=20, rate=5, root=topic_prefix)
    report = run_simulation(cfg, 6.0, procs=2, loss_burst=True)
    assert report.procs == 2 and report.devices == 20
    assert report.offline_bursts >= 2 and report.taken_offline >= 2  # one per process at 5 s
    assert report.reconnects >= report.taken_offline
    assert report.drained and report.backlog == 0
    assert report.acked == report.produced - report.overflow
    assert report.publish_rate > 50
