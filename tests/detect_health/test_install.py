"""Over the air: a real agent process running a detector installs detect bundles via MQTT.

A healthy v2 passes the pre-switch health check and switches; a v3 whose box weights moved
(signed by the fleet key, so only the health check can tell) fails with a reason naming the
golden input, class, box and IoU, and v2 keeps running; a rollback returns to v1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.bundle import MANIFEST_NAME, pack, verify_bundle
from edgefleet.agent.protocol import Event, InstallBundle, RollbackBundle, TopicTree
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.rollout.publisher import make_offer, publish
from tests.agent_harness import Collector
from tests.detect_agent.helpers import square_video
from tests.fleet_helpers import RawPublisher
from tests.rollout.fleet import send_command

from .helpers import corrupted, good, rewritten

pytestmark = pytest.mark.timeout(180)
DEVICE = "cam-det"


def _no_latency(src: Path, key: FleetKey) -> Path:
    """src without a latency expectation: the agent's own frames share these two cores, and
    the test must not depend on machine speed (tests/detect_health/test_check.py has it)."""
    health = json.loads((src / MANIFEST_NAME).read_bytes())["health"]
    health["latency_ms"] = {}
    return rewritten(src, src.with_name(src.name + "-nolat"), key, health=health)


class Device:
    """One agent process on a detector, a collector of its events and a raw publisher."""

    def __init__(self, root: Path, broker: MosquittoBroker, topic_root: str) -> None:
        self.key, _ = init_key(root / "keys")
        self.v1 = _no_latency(good(root / "v1", self.key, 1), self.key)
        self.tree = TopicTree(topic_root)
        self.topic_root = topic_root
        self.seen = Collector(broker, self.tree)
        self.raw = RawPublisher(broker)
        cfg = write_config(
            root / DEVICE,
            device_id=DEVICE,
            broker=broker,
            topic_root=topic_root,
            bundle=self.v1,
            key=self.key,
            video=square_video(root / "square.avi"),
            fps=60,
            extra="[update]\nconfirm_frames = 5\nrerequest_s = 2\ngive_up_s = 30\n",
        )
        self.agent = AgentProcess(cfg, root / "agent.log")
        self.state = root / DEVICE / "state"

    def sha(self, bundle: Path) -> str:
        return verify_bundle(bundle, [self.key.public]).manifest_sha256

    def running(self) -> str | None:
        with self.seen._lock:
            mine = [s for s in self.seen.status if s.device_id == DEVICE]
        return mine[-1].bundle_sha256 if mine else None

    def wait_running(self, sha: str, timeout: float = 60) -> None:
        wait_until(
            lambda: self.running() == sha, timeout, f"running {sha[:12]}", detail=self.agent.tail
        )

    def install(self, bundle: Path, tmp: Path) -> str:
        """Publish the bundle's archive and offer, send install_bundle; its manifest sha."""
        m = verify_bundle(bundle, [self.key.public])
        archive = pack(bundle, tmp / f"{bundle.name}.tar.gz")
        offer = make_offer(
            archive,
            model_id=m.manifest.model_id,
            version=m.manifest.version,
            manifest_sha256=m.manifest_sha256,
        )
        publish(self.raw.client, self.tree, archive, offer)
        cmd = InstallBundle(
            sha256=offer.sha256,
            model_id=m.manifest.model_id,
            version=m.manifest.version,
            manifest_sha256=m.manifest_sha256,
            rollout_id=None,
        )
        send_command(self.raw.client, self.topic_root, DEVICE, cmd)
        return m.manifest_sha256

    def outcome(self, manifest_sha256: str, states: tuple[str, ...], timeout: float = 90) -> Event:
        """The first event of this bundle's job in one of `states`."""
        box: dict[str, Event] = {}

        def ended() -> bool:
            with self.seen._lock:
                for e in self.seen.events:
                    d = e.details
                    if d.get("manifest_sha256") == manifest_sha256 and (
                        d.get("install_state") in states
                    ):
                        box["e"] = e
                        return True
            return False

        wait_until(ended, timeout, f"{manifest_sha256[:12]} in {states}", detail=self.agent.tail)
        return box["e"]

    def close(self) -> None:
        self.seen.close()
        self.raw.close()


@pytest.fixture
def device(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Device]:
    dev = Device(tmp_path, mqtt_broker, f"{topic_prefix}/edgefleet/v1")
    try:
        dev.wait_running(dev.sha(dev.v1))
        yield dev
    finally:
        code = dev.agent.terminate()
        dev.close()
        assert code == 0, dev.agent.output()


def test_detect_bundles_install_over_mqtt_through_the_health_check(
    device: Device, tmp_path: Path
) -> None:
    dev = device
    v2 = _no_latency(good(tmp_path / "v2", dev.key, 2), dev.key)
    v2_sha = dev.install(v2, tmp_path)
    states = [
        e.details["install_state"]
        for e in [dev.outcome(v2_sha, ("health_checking",)), dev.outcome(v2_sha, ("active",))]
    ]
    assert states == ["health_checking", "active"]
    active = dev.outcome(v2_sha, ("active",))
    # The health numbers reach the event: three golden boxes found again, bit for bit.
    assert active.details["task"] == "detect" and active.details["matched_boxes"] == 3
    assert active.details["box_failures"] == 0 and active.details["worst_iou"] == 1.0
    dev.wait_running(v2_sha)

    v3 = _no_latency(corrupted(tmp_path / "v3", dev.key, 3, dx=4.0), dev.key)
    v3_sha = dev.install(v3, tmp_path)
    failed = dev.outcome(v3_sha, ("failed", "active"))
    assert failed.kind == "error" and failed.details["install_state"] == "failed", failed
    assert (
        "health check failed: golden input 0: class 'square' golden box "
        "[16.0, 8.0, 24.0, 16.0] score 1.000: best match [20.0, 8.0, 28.0, 16.0] at IoU 0.333"
    ) in failed.message, failed.message

    # The old bundle keeps running: frames go through it after the failure (no switch, so
    # no new status), and the device's current bundle is still v2.
    def ran_after() -> bool:
        with dev.seen._lock:
            return any(
                t.window_start > failed.ts and t.frames_processed > 0 for t in dev.seen.telemetry
            )

    wait_until(ran_after, 30, "frames run after the failure", detail=dev.agent.tail)
    assert dev.running() == v2_sha
    current = dev.state / "bundles" / "current"
    assert verify_bundle(current, [dev.key.public]).manifest_sha256 == v2_sha
    assert not any(
        e.details.get("manifest_sha256") == v3_sha and e.details.get("install_state") == "active"
        for e in dev.seen.events
    )

    # A rollback from v2 builds the previous detector again and switches back to v1.
    send_command(
        dev.raw.client, dev.topic_root, DEVICE, RollbackBundle(manifest_sha256=v2_sha, reason="t")
    )
    v1_sha = dev.sha(dev.v1)
    back = dev.outcome(v1_sha, ("rolled_back", "failed"))
    assert back.details["install_state"] == "rolled_back", back
    dev.wait_running(v1_sha)
