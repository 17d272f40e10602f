"""What simulated devices report: operating points ordered like a bundle, an agent's governor."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.protocol import (
    Command,
    Event,
    Reply,
    SetOperatingPoint,
    Status,
    Telemetry,
    TopicTree,
    encode,
)
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.local.broker import MosquittoBroker
from tests.simulate.helpers import (
    Collector,
    start,
)

pytestmark = pytest.mark.timeout(120)


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
    sim = start(sims, cfg)
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
    sim = start(sims, cfg)
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


