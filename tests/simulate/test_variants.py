"""Simulated devices that run model variants: latency per variant, point, class and slowdown;
installs and rollbacks answered and reported as the agent does, against a real mosquitto."""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.bundle import generate_private_key, verify_bundle, write_bundle
from edgefleet.agent.bundle.manifest import OperatingPoint
from edgefleet.agent.protocol import (
    Command,
    Event,
    InstallBundle,
    Reply,
    RollbackBundle,
    SetOperatingPoint,
    Status,
    Telemetry,
    TopicTree,
    decode,
    encode,
)
from edgefleet.agent.protocol.commands import AnyCommand
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.fleet.simulate.variants import (
    CLASS_SPEED,
    SimVariant,
    sim_variant_from_manifest,
)
from edgefleet.server.fleet.store.base import EventRecord
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.rollout.engine import _FROM_EVENT, _latest_install_event
from tests.bundle_helpers import one_stage_body, two_stage_body, two_stage_files
from tests.simulate.helpers import Collector, start

pytestmark = pytest.mark.timeout(120)


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


V1 = SimVariant(_sha("v1"), "simnet", 1, point_ms=(20.0, 10.0), default_point=0)
V2 = SimVariant(_sha("v2"), "simnet", 2, point_ms=(12.0, 6.0, 3.0), default_point=1)
V3 = SimVariant(_sha("v3"), "simnet", 3, point_ms=(8.0,), default_point=0)
UNKNOWN = _sha("not configured")
# Board i % 4 of workload.BOARDS.
CLASSES = ["rpi5", "rpi4", "jetson-orin-nano", "x86-avx2"]


def _cfg(broker: MosquittoBroker, root: str, devices: int = 4, **kw: Any) -> SimConfig:
    fields: dict[str, Any] = {
        "rate": 5.0,
        "root": root,
        "events_every": 0,
        "variants": (V1, V2, V3),
        "initial_variant": V1.manifest_sha256,
        "install_s": 0.5,
        "seed": 3,
    }
    fields.update(kw)
    return SimConfig(broker.host, broker.port, devices=devices, **fields)


class Commands:
    """Sends commands as the coordinator would and waits for their replies."""

    def __init__(self, publisher: mqtt.Client, collector: Collector, root: str) -> None:
        self.publisher = publisher
        self.collector = collector
        self.tree = TopicTree(root)

    def send(self, device: str, body: AnyCommand) -> str:
        cid = f"c-{uuid.uuid4().hex[:10]}"
        payload = encode(Command(id=cid, ts=time.time(), command=body))
        self.publisher.publish(self.tree.device(device, "cmd"), payload, qos=1).wait_for_publish(5)
        return cid

    def reply(self, cid: str) -> Reply:
        def found() -> list[Reply]:
            return [r for r in self.collector.of(Reply) if r.id == cid]

        self.collector.wait_for(f"reply {cid}", lambda: bool(found()))
        return found()[0]

    def run(self, device: str, body: AnyCommand) -> Reply:
        return self.reply(self.send(device, body))


def _install(variant: SimVariant, rollout_id: str | None = "r-1", **kw: Any) -> InstallBundle:
    fields: dict[str, Any] = {
        "sha256": _sha(f"archive of {variant.manifest_sha256}"),
        "model_id": variant.model_id,
        "version": variant.version,
        "manifest_sha256": variant.manifest_sha256,
        "rollout_id": rollout_id,
    }
    fields.update(kw)
    return InstallBundle(**fields)


def _install_events(c: Collector, device: str) -> list[Event]:
    return [e for e in c.of(Event, device) if "install_state" in e.details]


def _states(c: Collector, device: str) -> list[Any]:
    return [e.details["install_state"] for e in _install_events(c, device)]


def _last_birth(c: Collector, device: str) -> Status:
    births: list[Status] = [s for s in c.of(Status, device) if s.online]
    return births[-1]


def _retained_status(broker: MosquittoBroker, root: str, device: str) -> Status:
    """What a client connecting now is given on the status topic (the retained message)."""
    got: list[mqtt.MQTTMessage] = []
    arrived = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(msg)
        arrived.set()

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(TopicTree(root).device(device, "status"), qos=1)
    client.loop_start()
    try:
        assert arrived.wait(10), f"no retained status for {device}"
    finally:
        client.disconnect()
        client.loop_stop()
    assert got[0].retain
    status = decode(Status, bytes(got[0].payload))
    assert isinstance(status, Status)
    return status


def _windows(c: Collector, device: str, keep: Callable[[Telemetry], bool]) -> list[Telemetry]:
    return [t for t in c.of(Telemetry, device) if t.frames_processed > 0 and keep(t)]


def _wait_windows(
    c: Collector, device: str, keep: Callable[[Telemetry], bool], n: int = 8
) -> list[Telemetry]:
    c.wait_for(f"{n} windows of {device}", lambda: len(_windows(c, device, keep)) >= n, 30)
    return _windows(c, device, keep)


def _p95(windows: list[Telemetry]) -> float:
    return statistics.median(t.latency_ms.p95 for t in windows)


@pytest.fixture
def commands(publisher: mqtt.Client, collector: Collector, topic_prefix: str) -> Commands:
    return Commands(publisher, collector, topic_prefix)


# -- configuration and variants from bundles (no broker) -------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"initial_variant": None}, "initial_variant is required"),
        ({"initial_variant": UNKNOWN}, "is not one of the variants"),
        ({"variants": (), "initial_variant": V1.manifest_sha256}, "needs variants"),
        ({"variants": (V1, V1)}, "given twice"),
        ({"install_s": -1.0}, "install_s must be >= 0"),
        ({"class_speed": {"rpi5": 1.0}}, "lacks the device classes"),
        ({"class_speed": {**CLASS_SPEED, "rpi4": 0.0}}, "must be > 0"),
    ],
)
def test_config_is_checked(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "variants": (V1, V2),
        "initial_variant": V1.manifest_sha256,
    }
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        SimConfig("localhost", 1883, devices=4, rate=1.0, **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"manifest_sha256": "abc"}, "64 lowercase hex"),
        ({"model_id": "no/slash"}, "not a valid id"),
        ({"point_ms": ()}, "at least one operating point"),
        ({"point_ms": (5.0, -1.0)}, "> 0"),
        ({"default_point": 2}, "out of range"),
        ({"early_exit_share": (0.1,)}, "1 values for 2 operating points"),
        ({"early_exit_share": (0.1, 1.5)}, r"in \[0, 1\]"),
    ],
)
def test_variant_is_checked(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "manifest_sha256": _sha("x"),
        "model_id": "m",
        "version": 1,
        "point_ms": (5.0, 2.0),
        "default_point": 0,
    }
    with pytest.raises(ValueError, match=message):
        SimVariant(**{**base, **fields})


def test_variant_from_a_signed_bundle(tmp_path: Path) -> None:
    key = generate_private_key()
    body = two_stage_body(
        operating_points=[
            OperatingPoint(
                name="accurate", thresholds=[0.95], expected_macs=2400.0, exit_rates=[0.2, 0.8]
            ),
            OperatingPoint(
                name="fast", thresholds=[0.6], expected_macs=1200.0, exit_rates=[0.7, 0.3]
            ),
        ],
        default_operating_point=1,
    )
    write_bundle(tmp_path / "b", body, two_stage_files(), key)
    verified = verify_bundle(tmp_path / "b", [key.public_key()])

    v = sim_variant_from_manifest(verified.manifest_sha256, verified.manifest, ms_per_mac=0.01)
    assert v.manifest_sha256 == verified.manifest_sha256
    assert (v.model_id, v.version, v.default_point) == ("tiny-cnn", 3, 1)
    assert v.point_ms == pytest.approx((24.0, 12.0))
    assert v.early_exit_share == (0.2, 0.7)

    # Points without expected_macs cost every stage (2304 + 268 MACs); no exit_rates: a ramp.
    plain = sim_variant_from_manifest(_sha("p"), two_stage_body(), ms_per_mac=0.01)
    assert plain.point_ms == pytest.approx((25.72, 25.72))
    assert plain.early_exit_share == ()
    assert plain.exit_share(0) < plain.exit_share(1)
    with pytest.raises(ValueError, match="no expected_macs"):
        sim_variant_from_manifest(_sha("q"), one_stage_body(), ms_per_mac=0.01)


# -- against the broker ------------------------------------------------------------------------


def test_birth_and_latency_follow_variant_point_class_and_slowdown(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    collector: Collector,
    commands: Commands,
    sims: list[Simulator],
) -> None:
    sim = start(sims, _cfg(mqtt_broker, topic_prefix, devices=8))
    ids = sim.device_ids()
    collector.wait_for(
        "every birth", lambda: {s.device_id for s in collector.of(Status)} >= set(ids)
    )
    for i, dev in enumerate(ids):
        birth = _last_birth(collector, dev)
        assert birth.hardware.device_class == CLASSES[i % 4]
        assert birth.bundle_sha256 == V1.manifest_sha256
        assert birth.previous_bundle_sha256 is None
        assert (birth.model_id, birth.model_version, birth.operating_point) == ("simnet", 1, 0)
        assert sim.running(dev) == (V1.manifest_sha256, 0)

    # Each class at V1's point 0 (20 ms at speed 1.0): p95 ~ 1.3 x 20 ms x its speed.
    per_class = {
        CLASSES[i]: _wait_windows(collector, ids[i], lambda t: t.operating_point == 0)
        for i in range(4)
    }
    for cls, windows in per_class.items():
        assert _p95(windows) == pytest.approx(1.3 * 20.0 * CLASS_SPEED[cls], rel=0.08), cls
        assert all(t.model_id == "simnet" and t.model_version == 1 for t in windows)
        assert all(sum(t.exit_histogram) == t.frames_processed for t in windows)
        assert all(t.latency_ms.p50 <= t.latency_ms.p95 <= t.latency_ms.p99 for t in windows)
    ratio = _p95(per_class["rpi4"]) / _p95(per_class["x86-avx2"])
    assert ratio == pytest.approx(CLASS_SPEED["rpi4"] / CLASS_SPEED["x86-avx2"], rel=0.1)
    # rpi4 takes ~50 ms a frame, so it keeps up with fewer of the camera's 30 fps than x86.
    fps = {cls: statistics.median(t.fps for t in w) for cls, w in per_class.items()}
    assert fps["rpi4"] < fps["x86-avx2"]

    # A pinned faster point halves V1's latency; no simulated governor moves it back.
    rpi5 = ids[0]
    pin = commands.run(rpi5, SetOperatingPoint(index=1, pin=True))
    assert pin.ok, pin.error
    assert sim.running(rpi5) == (V1.manifest_sha256, 1)
    fast = _wait_windows(collector, rpi5, lambda t: t.operating_point == 1)
    assert _p95(fast) == pytest.approx(1.3 * 10.0, rel=0.08)
    bad = commands.run(rpi5, SetOperatingPoint(index=2))
    assert not bad.ok and "does not exist (0..1)" in (bad.error or "")

    # A CPU-hungry neighbour on one device: x3 from the next window, then gone again.
    slowed, other = ids[4], ids[5]  # rpi5 and rpi4 again
    sim.set_slowdown([slowed], 3.0)
    first_slow = sim.stats().by_id()[slowed].next_seq
    slow = _wait_windows(collector, slowed, lambda t: t.seq >= first_slow)
    assert _p95(slow) == pytest.approx(3 * 1.3 * 20.0, rel=0.08)
    mark_other = sim.stats().by_id()[other].next_seq
    unaffected = _wait_windows(collector, other, lambda t: t.seq >= mark_other, n=4)
    assert _p95(unaffected) == pytest.approx(1.3 * 20.0 * CLASS_SPEED["rpi4"], rel=0.08)
    sim.set_slowdown(None, 1.0)
    first_fast = sim.stats().by_id()[slowed].next_seq
    back = _wait_windows(collector, slowed, lambda t: t.seq >= first_fast)
    assert _p95(back) == pytest.approx(1.3 * 20.0, rel=0.08)
    with pytest.raises(ValueError, match="unknown simulated device"):
        sim.set_slowdown(["nobody"], 2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        sim.set_slowdown(None, 0.0)
    assert collector.errors == []


def test_install_reports_each_state_and_publishes_the_new_status(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    collector: Collector,
    commands: Commands,
    sims: list[Simulator],
) -> None:
    sim = start(sims, _cfg(mqtt_broker, topic_prefix))
    dev = sim.device_ids()[2]
    collector.wait_for("the birth", lambda: bool(collector.of(Status, dev)))
    # A pin before the install: the new variant starts unpinned at its default point.
    assert commands.run(dev, SetOperatingPoint(index=1, pin=True)).ok

    accepted = commands.run(dev, _install(V2))
    assert accepted.ok, accepted.error
    assert accepted.result == {"state": "accepted", "manifest_sha256": V2.manifest_sha256}
    collector.wait_for("the active event", lambda: "active" in _states(collector, dev), 30)

    events = _install_events(collector, dev)
    assert _states(collector, dev) == [
        "downloading",
        "downloading",
        "downloading",
        "verifying",
        "health_checking",
        "active",
    ]
    assert [e.kind for e in events] == ["install_progress"] * 5 + ["installed"]
    for e in events:
        assert e.details["rollout_id"] == "r-1"
        assert e.details["manifest_sha256"] == V2.manifest_sha256
        assert e.details["version"] == 2
        assert e.level == "info"
    progress = [(e.details.get("have"), e.details.get("total")) for e in events[:3]]
    assert progress == [(None, None), (4, 8), (8, 8)]
    active = events[-1].details
    assert active["from_version"] == 1 and active["device_class"] == "jetson-orin-nano"
    assert events[-1].message.startswith("installed simnet v2 (was v1)")

    # The status says what runs now: retained, so a coordinator that starts later sees it.
    collector.wait_for(
        "the new birth", lambda: _last_birth(collector, dev).bundle_sha256 == V2.manifest_sha256
    )
    for status in (_last_birth(collector, dev), _retained_status(mqtt_broker, topic_prefix, dev)):
        assert status.online
        assert status.bundle_sha256 == V2.manifest_sha256
        assert status.previous_bundle_sha256 == V1.manifest_sha256
        assert (status.model_id, status.model_version, status.operating_point) == ("simnet", 2, 1)
        assert status.hardware.device_class == "jetson-orin-nano"
    assert sim.running(dev) == (V2.manifest_sha256, 1)
    windows = _wait_windows(collector, dev, lambda t: t.model_version == 2, n=4)
    assert all(t.operating_point == 1 for t in windows)
    assert _p95(windows) == pytest.approx(1.3 * 6.0 * CLASS_SPEED["jetson-orin-nano"], rel=0.08)
    # Unpinned: a pin on point 2 of V2 (it has three) is accepted.
    assert commands.run(dev, SetOperatingPoint(index=2)).ok

    # Installing what runs is answered from the state, as the agent does: nothing happens.
    again = commands.run(dev, _install(V2))
    assert again.ok
    assert again.result == {
        "state": "active",
        "manifest_sha256": V2.manifest_sha256,
        "already": True,
    }

    # The rollout engine reads exactly these events: the newest says "active".
    records = [EventRecord(dev, e.seq, time.time(), e) for e in reversed(collector.of(Event, dev))]
    latest = _latest_install_event(records, "r-1", V2.manifest_sha256)
    assert (
        latest is not None and _FROM_EVENT[str(latest.event.details["install_state"])] == "active"
    )
    assert all(s in _FROM_EVENT for s in _states(collector, dev))

    # The other devices still run V1.
    assert all(sim.running(d)[0] == V1.manifest_sha256 for d in sim.device_ids() if d != dev)
    assert collector.errors == []


def test_refused_and_failed_installs_leave_the_variant_running(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    collector: Collector,
    commands: Commands,
    sims: list[Simulator],
) -> None:
    # A long install, so that the second and third commands find it under way.
    sim = start(sims, _cfg(mqtt_broker, topic_prefix, devices=2, install_s=600.0))
    dev, other = sim.device_ids()
    collector.wait_for("the births", lambda: len(collector.of(Status)) >= 2)

    unknown = commands.run(dev, _install(V2, manifest_sha256=UNKNOWN, rollout_id="r-9"))
    assert not unknown.ok
    assert "not one of the simulated variants" in (unknown.error or "")
    collector.wait_for("the refusal", lambda: "refused" in _states(collector, dev))
    refusal = _install_events(collector, dev)[-1]
    assert refusal.kind == "error" and refusal.level == "error"
    assert refusal.details == {
        "install_state": "refused",
        "manifest_sha256": UNKNOWN,
        "rollout_id": "r-9",
        "version": 2,
        "reason": "unknown_variant",
    }

    other_model = commands.run(dev, _install(V2, model_id="othernet"))
    assert not other_model.ok and "allow_model_change not set" in (other_model.error or "")
    collector.wait_for("the second refusal", lambda: _states(collector, dev).count("refused") == 2)
    assert _install_events(collector, dev)[-1].details["reason"] == "other_model"

    assert commands.run(dev, _install(V2)).result == {
        "state": "accepted",
        "manifest_sha256": V2.manifest_sha256,
    }
    collector.wait_for("the download", lambda: "downloading" in _states(collector, dev))
    under_way = commands.run(dev, _install(V2))
    assert under_way.ok and under_way.result is not None
    assert under_way.result["state"] == "downloading"
    busy = commands.run(dev, _install(V3, rollout_id="r-3"))
    assert not busy.ok and "busy: install of" in (busy.error or "")
    collector.wait_for("the busy refusal", lambda: _states(collector, dev).count("refused") == 3)
    assert _install_events(collector, dev)[-1].details["reason"] == "busy"
    assert sim.running(dev) == (V1.manifest_sha256, 0)

    # The archive holds another version than the command names: failed once verified.
    quick = start(sims, _cfg(mqtt_broker, topic_prefix, devices=1, prefix="q", install_s=0.2))
    (q,) = quick.device_ids()
    assert commands.run(q, _install(V3, version=7)).ok
    collector.wait_for("the failure", lambda: "failed" in _states(collector, q), 30)
    assert _states(collector, q)[-2:] == ["verifying", "failed"]
    failed = _install_events(collector, q)[-1]
    assert failed.kind == "error" and "holds simnet v3, the command says simnet v7" in str(
        failed.details["reason"]
    )
    # Windows well past the time the switch would have come: still V1, no "active".
    later = quick.stats().by_id()[q].next_seq + 4
    _wait_windows(collector, q, lambda t: t.seq >= later, n=1)
    assert "active" not in _states(collector, q)
    assert quick.running(q) == (V1.manifest_sha256, 0)
    assert sim.running(other) == (V1.manifest_sha256, 0)
    assert collector.errors == []


def test_rollback_returns_to_the_previous_variant(
    mqtt_broker: MosquittoBroker,
    topic_prefix: str,
    collector: Collector,
    commands: Commands,
    sims: list[Simulator],
) -> None:
    sim = start(sims, _cfg(mqtt_broker, topic_prefix, devices=1, install_s=0.2))
    (dev,) = sim.device_ids()

    nothing = commands.run(dev, RollbackBundle(manifest_sha256=V1.manifest_sha256))
    assert not nothing.ok and "no previous bundle" in (nothing.error or "")

    assert commands.run(dev, _install(V2, rollout_id="r-2")).ok
    wait_until(lambda: sim.running(dev)[0] == V2.manifest_sha256, 30, "V2 running")

    back = commands.run(
        dev, RollbackBundle(manifest_sha256=V2.manifest_sha256, rollout_id="r-2", reason="halted")
    )
    assert back.ok, back.error
    assert back.result == {"rolled_back": True, "to": f"simnet-v1-{V1.manifest_sha256[:12]}"}
    collector.wait_for("the rollback event", lambda: "rolled_back" in _states(collector, dev), 30)
    event = _install_events(collector, dev)[-1]
    assert event.kind == "rollback" and event.level == "error"
    assert event.message == "rolled back to simnet v1 (halted)"
    assert event.details["manifest_sha256"] == V1.manifest_sha256  # what runs now, as the agent
    assert event.details["rollout_id"] == "r-2"
    assert (event.details["version"], event.details["from_version"]) == (1, 2)
    collector.wait_for(
        "the birth after the rollback",
        lambda: _last_birth(collector, dev).bundle_sha256 == V1.manifest_sha256,
    )
    status = _retained_status(mqtt_broker, topic_prefix, dev)
    assert status.bundle_sha256 == V1.manifest_sha256 and status.previous_bundle_sha256 is None
    assert status.model_version == 1
    assert sim.running(dev) == (V1.manifest_sha256, 0)

    # Idempotent: naming a bundle that no longer runs does nothing.
    stale = commands.run(dev, RollbackBundle(manifest_sha256=V2.manifest_sha256))
    assert stale.ok
    assert stale.result == {"rolled_back": False, "running": V1.manifest_sha256}
    assert collector.errors == []
