"""The rollout engine's reading of a device's state, on a real store and real archives.

The agent's status (retained, sent on a swap) and its events (through the outbox) travel
apart, so the engine sees them in either order. These tests feed it both orders by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import generate_private_key
from edgefleet.agent.protocol import Event, Hardware, Status
from edgefleet.server.fleet.store import EventIn, IngestBatch, StatusIn, Store, open_store
from edgefleet.server.rollout.archives import ArchiveStore
from edgefleet.server.rollout.engine import EngineSettings, RolloutEngine
from edgefleet.server.rollout.spec import RolloutSpec
from tests.rollout.fakes import Clock, Publisher, Sender
from tests.rollout.test_archives import make_bundle


class Rig:
    def __init__(self, tmp_path: Path, key: Ed25519PrivateKey) -> None:
        self.clock = Clock()
        self.store: Store = open_store(str(tmp_path / "fleet.db"))
        self.archives = ArchiveStore(tmp_path / "archives", [key.public_key()])
        self.sender = Sender()
        self.engine = RolloutEngine(
            self.store,
            self.archives,
            self.sender,
            Publisher(),
            settings=EngineSettings(resend_s=1e6),
            clock=self.clock,
        )
        self.seq = 0
        self.info = self.archives.add(make_bundle(tmp_path, key, 4))

    def status(self, device_id: str, bundle_sha256: str | None) -> None:
        self.clock.now += 1
        birth = Status(
            device_id=device_id,
            online=True,
            ts=self.clock.now,
            agent_version="0.1.0",
            model_id="tiny-cnn",
            model_version=3,
            operating_point=0,
            group="lab",
            hardware=Hardware(machine="x86_64", system="Linux", cpu_count=2, ram_mb=1024.0),
            boot_id="3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b",
            bundle_sha256=bundle_sha256,
        )
        self.store.ingest(
            IngestBatch(statuses=[StatusIn(received_at=self.clock.now, status=birth)])
        )

    def install_event(self, device_id: str, rollout_id: str, state: str) -> None:
        self.clock.now += 1
        self.seq += 1
        event = Event(
            device_id=device_id,
            ts=self.clock.now,
            seq=self.seq,
            kind="installed" if state == "active" else "install_progress",
            message=f"install {state}",
            details={
                "install_state": state,
                "rollout_id": rollout_id,
                "manifest_sha256": self.info.manifest_sha256,
            },
        )
        self.store.ingest(IngestBatch(events=[EventIn(received_at=self.clock.now, event=event)]))

    def state(self, rollout_id: str, device_id: str) -> str:
        (d,) = [d for d in self.store.rollout_devices(rollout_id) if d.device_id == device_id]
        return d.state

    def tick(self) -> None:
        self.clock.now += 1
        self.engine.tick()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path, generate_private_key())


def start(rig: Rig, soak_s: float = 0) -> str:
    rig.status("pi-1", None)
    rid = rig.engine.create("lab", rig.info.sha256, RolloutSpec(canary="1", soak_s=soak_s))
    rig.tick()  # publish
    rig.tick()  # wave 0: the install goes out
    assert rig.sender.sent == [("pi-1", "install_bundle")]
    return rid


def test_events_move_the_device_through_the_install_states(rig: Rig) -> None:
    rid = start(rig)
    assert rig.state(rid, "pi-1") == "sent"
    for state in ("downloading", "verifying", "health_checking"):
        rig.install_event("pi-1", rid, state)
        rig.tick()
        assert rig.state(rid, "pi-1") == state
    rig.install_event("pi-1", rid, "active")
    rig.tick()
    assert rig.state(rid, "pi-1") == "active"
    rig.tick()
    r = rig.store.rollout(rid)
    assert r is not None and r.state == "completed"


def test_a_status_showing_the_bundle_running_wins_over_an_older_install_event(
    rig: Rig,
) -> None:
    rid = start(rig)
    rig.install_event("pi-1", rid, "verifying")
    rig.tick()
    # The swap's status arrives before the install events still in the device's outbox.
    rig.status("pi-1", rig.info.manifest_sha256)
    rig.tick()
    assert rig.state(rid, "pi-1") == "active"
    rig.install_event("pi-1", rid, "health_checking")
    for _ in range(3):
        rig.tick()
        # Never back to health_checking: the device is running the new bundle.
        assert rig.state(rid, "pi-1") == "active"
    r = rig.store.rollout(rid)
    assert r is not None and r.state == "completed"


def test_a_canary_that_rolls_back_in_the_soak_halts_the_rollout(rig: Rig) -> None:
    rid = start(rig, soak_s=600)
    rig.install_event("pi-1", rid, "active")
    rig.tick()
    assert rig.state(rid, "pi-1") == "active"
    rig.install_event("pi-1", rid, "rolled_back")
    rig.tick()
    assert rig.state(rid, "pi-1") == "rolled_back"
    r = rig.store.rollout(rid)
    assert r is not None and r.state == "halted"
