"""Bad input reaches real agents: each refuses it with an event that says why, and keeps running.

The archives here go to the broker straight from a test client (as a compromised or buggy
publisher could), past the coordinator's upload check, and the test sends the install
commands itself: only the device stands between them and its model. The last test is the
coordinator's side: a device that never answers times out and blocks no one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.bundle import pack, verify_bundle
from edgefleet.agent.protocol import Event, InstallBundle, TopicTree
from edgefleet.server.keystore import init_key
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.rollout.publisher import make_offer, publish
from tests.agent_harness import Collector
from tests.fleet_helpers import RawPublisher
from tests.rollout.fleet import (
    LocalFleet,
    local_fleet,
    reference_version,
    resigned,
    send_command,
    state_dir,
)
from tests.rollout.test_deploy import _finished, _manifest_sha, _upload

pytestmark = pytest.mark.timeout(120)


class Devices:
    """Agents without a coordinator: a collector sees their events and status, a raw client
    publishes archives and sends commands."""

    def __init__(self, fleet: LocalFleet, broker: MosquittoBroker, v1: Path) -> None:
        self.fleet = fleet
        self.v1 = v1
        self.v1_sha = _manifest_sha(v1, fleet)
        self.tree = TopicTree(fleet.topic_root)
        self.seen = Collector(broker, self.tree)
        self.raw = RawPublisher(broker)

    def running(self, device_id: str) -> str | None:
        """Manifest sha256 in the device's newest status (None before its first)."""
        with self.seen._lock:
            mine = [s for s in self.seen.status if s.device_id == device_id]
        return mine[-1].bundle_sha256 if mine else None

    def wait_running(self, ids: list[str], timeout: float = 60) -> None:
        wait_until(
            lambda: all(self.running(d) == self.v1_sha for d in ids),
            timeout,
            f"{ids} online on v1",
            detail=self.fleet.logs,
        )

    def install_events(self, device_id: str) -> list[Event]:
        with self.seen._lock:
            return [
                e
                for e in self.seen.events
                if e.device_id == device_id and "install_state" in e.details
            ]

    def outcome(self, device_id: str, timeout: float = 60) -> Event:
        """The first install event that ends a job: failed, refused or active."""
        box: dict[str, Event] = {}

        def ended() -> bool:
            for e in self.install_events(device_id):
                if e.details["install_state"] in ("failed", "refused", "active"):
                    box["e"] = e
                    return True
            return False

        wait_until(ended, timeout, f"{device_id}'s install outcome", detail=self.fleet.logs)
        return box["e"]

    def offer_archive(
        self, archive: Path, manifest_sha256: str, version: int, *, skip: set[int] = frozenset()
    ) -> str:
        """Publish archive's chunks (less those in skip) and its offer; its sha256."""
        offer = make_offer(
            archive, model_id="mnist-cnn", version=version, manifest_sha256=manifest_sha256
        )
        publish(self.raw.client, self.tree, archive, offer)
        for i in skip:
            # A chunk the broker lost: an empty retained payload deletes it, the offer stays.
            self.raw.publish(self.tree.bundle_chunk(offer.sha256, i), b"", retain=True)
        return offer.sha256

    def install(
        self, device_id: str, sha256: str, manifest_sha256: str, version: int, **kw: object
    ) -> None:
        body = InstallBundle(
            sha256=sha256,
            model_id=str(kw.get("model_id", "mnist-cnn")),
            version=version,
            manifest_sha256=manifest_sha256,
            rollout_id=None,
        )
        send_command(self.raw.client, self.fleet.topic_root, device_id, body)

    def close(self) -> None:
        self.seen.close()
        self.raw.close()


@pytest.fixture
def devices(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Devices]:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        devs = Devices(fleet, mqtt_broker, v1)
        try:
            for i in range(2):
                fleet.start_agent(f"cam-{i}", v1, update="give_up_s = 4\n")
            devs.wait_running(["cam-0", "cam-1"])
            yield devs
        finally:
            devs.close()


def _stays_on_v1(devs: Devices, device_id: str) -> None:
    assert devs.running(device_id) == devs.v1_sha, devs.fleet.logs()
    current = state_dir(devs.fleet, device_id) / "bundles" / "current"
    # Either no install ever switched (no current yet), or current is v1 (kept before it).
    if current.exists():
        assert verify_bundle(current, [devs.fleet.key.public]).manifest_sha256 == devs.v1_sha


@pytest.mark.parametrize("tamper", ["stage_byte", "other_key"])
def test_a_tampered_archive_on_the_broker_is_refused_by_every_agent(
    devices: Devices, tmp_path: Path, tamper: str
) -> None:
    devs = devices
    v2 = reference_version(tmp_path / "v2", devs.fleet.key, 2)
    if tamper == "stage_byte":
        # The manifest still names the real file's hash; the archive's own sha256 (and the
        # offer's chunk hashes) are those of the tampered archive, so only the bundle's
        # per-file hash can catch it.
        manifest = _manifest_sha(v2, devs.fleet)
        stage = v2 / "model.onnx"
        data = bytearray(stage.read_bytes())
        data[len(data) // 2] ^= 0x01
        stage.write_bytes(bytes(data))
        bundle, want = v2, r"model\.onnx: sha256 .* != manifest"
    else:
        other, _ = init_key(tmp_path / "other-key")
        bundle = resigned(v2, tmp_path / "resigned", other.private)
        manifest = verify_bundle(bundle, [other.public]).manifest_sha256
        want = r"signed by key .* not trusted"
    archive = pack(bundle, tmp_path / "tampered.tar.gz")
    sha = devs.offer_archive(archive, manifest, 2)
    for d in ("cam-0", "cam-1"):
        devs.install(d, sha, manifest, 2)
    for d in ("cam-0", "cam-1"):
        e = devs.outcome(d)
        assert e.kind == "error" and e.details["install_state"] == "failed", e
        assert e.details["manifest_sha256"] == manifest
        assert re.search(want, e.message), e.message
        _stays_on_v1(devs, d)
        # Nothing of it was kept as an installed version.
        bundles = state_dir(devs.fleet, d) / "bundles"
        kept = (
            [p for p in bundles.iterdir() if p.is_dir() and "-v2-" in p.name]
            if bundles.is_dir()
            else []
        )
        assert kept == [], kept


def test_a_bundle_for_another_model_is_refused(devices: Devices, tmp_path: Path) -> None:
    devs = devices
    devs.install("cam-0", "ab" * 32, "cd" * 32, 2, model_id="face-detect")
    e = devs.outcome("cam-0", 30)
    assert e.kind == "error" and e.details["install_state"] == "refused", e
    assert e.details["reason"] == "other_model"
    assert "face-detect" in e.message and "mnist-cnn" in e.message, e.message
    _stays_on_v1(devs, "cam-0")


def test_an_offer_that_never_completes_fails_and_the_old_model_keeps_running(
    devices: Devices, tmp_path: Path
) -> None:
    devs = devices
    v2 = reference_version(tmp_path / "v2", devs.fleet.key, 2)
    manifest = _manifest_sha(v2, devs.fleet)
    archive = pack(v2, tmp_path / "v2.tar.gz")
    sha = devs.offer_archive(archive, manifest, 2, skip={3})
    devs.install("cam-0", sha, manifest, 2)
    e = devs.outcome("cam-0", 60)
    assert e.kind == "error" and e.details["install_state"] == "failed", e
    total = make_offer(archive, model_id="m", version=2, manifest_sha256=manifest).chunk_count
    assert f"never completed: {total - 1}/{total} chunks" in e.message, e.message
    assert "[3]" in e.message, e.message  # the chunk it waited for
    _stays_on_v1(devs, "cam-0")
    failed_at = e.ts

    def inferring() -> bool:
        with devs.seen._lock:
            after = [
                t
                for t in devs.seen.telemetry
                if t.device_id == "cam-0" and t.window_start >= failed_at
            ]
        return len(after) >= 2 and all(t.frames_processed > 0 for t in after)

    wait_until(inferring, 30, "cam-0 inferring after the failed install", detail=devs.fleet.logs)


def test_a_bundle_over_the_disk_budget_is_refused_naming_both_sizes(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        devs = Devices(fleet, mqtt_broker, v1)
        try:
            fleet.start_agent("cam-small", v1, update="disk_budget_mb = 1\n")
            devs.wait_running(["cam-small"])
            v2 = reference_version(tmp_path / "v2", fleet.key, 2)
            manifest = _manifest_sha(v2, fleet)
            archive = pack(v2, tmp_path / "v2.tar.gz")
            size = archive.stat().st_size
            assert size > 2**20, "the reference archive must be over the 1 MiB budget"
            sha = devs.offer_archive(archive, manifest, 2)
            devs.install("cam-small", sha, manifest, 2)
            e = devs.outcome("cam-small", 60)
            assert e.kind == "error" and e.details["install_state"] == "failed", e
            assert f"{size} bytes" in e.message and f"{2**20} bytes" in e.message, e.message
            _stays_on_v1(devs, "cam-small")
        finally:
            devs.close()


def test_a_device_that_never_answers_times_out_and_blocks_no_one(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        client = fleet.start_coordinator()
        for i in range(3):
            fleet.start_agent(f"cam-{i}", v1)
        fleet.wait_online(client, 3)
        fleet.agents["cam-2"].terminate(10)
        wait_until(
            lambda: not next(d for d in client.devices() if d.device_id == "cam-2").online,
            30,
            "cam-2 offline",
        )
        sha = _upload(client, reference_version(tmp_path / "v2", fleet.key, 2), tmp_path)
        view = client.create_rollout(
            {
                "bundle_sha256": sha,
                "group": "lab",
                "canary": "1",
                "soak_s": 0,
                "waves": "100%",
                "device_deadline_s": 20,
                "max_failed": 0.5,
            }
        )
        done = _finished(client, view.rollout_id, fleet, 90)
        states = {d.device_id: (d.wave, d.state) for d in done.devices or []}
        assert states["cam-2"] == (1, "timed_out"), states  # never a canary: it was offline
        assert states["cam-0"][1] == states["cam-1"][1] == "active", states
        assert done.state == "completed", done
        other = next(d for d in done.devices or [] if d.wave == 1 and d.device_id != "cam-2")
        # The online device of cam-2's wave did not wait for cam-2's deadline.
        assert other.updated_at is not None and other.sent_at is not None
        assert other.updated_at - other.sent_at < 20, other
