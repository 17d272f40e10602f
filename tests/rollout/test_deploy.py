"""Rollouts end to end: a real broker, the coordinator service, agents as processes.

Each test deploys through the HTTP API the CLI uses and then checks what the devices run
(their retained status names the manifest sha256 of the running bundle), what the store says
of every device, and what is left on the broker.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from edgefleet.agent.bundle import pack, verify_bundle
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.rollout.views import RolloutView
from tests.rollout.fleet import LocalFleet, broken_golden, local_fleet, reference_version


def _running(client: FleetClient) -> dict[str, str | None]:
    """device -> manifest sha256 it reports running."""
    return {d.device_id: d.bundle_sha256 for d in client.devices()}


def _finished(
    client: FleetClient, rollout_id: str, fleet: LocalFleet, timeout: float
) -> RolloutView:
    box: dict[str, RolloutView] = {}

    def done() -> bool:
        view = client.rollout(rollout_id)
        box["v"] = view
        return view.phase == "done"

    wait_until(
        done,
        timeout,
        f"rollout {rollout_id} to finish",
        detail=lambda: f"{box.get('v')}\n{fleet.logs()}",
    )
    return box["v"]


def _upload(client: FleetClient, bundle: Path, tmp: Path) -> str:
    archive = pack(bundle, tmp / f"{bundle.name}.tar.gz")
    return client.upload_bundle(archive.read_bytes()).sha256


def _manifest_sha(bundle: Path, fleet: LocalFleet) -> str:
    return verify_bundle(bundle, [fleet.key.public]).manifest_sha256


@pytest.fixture
def fleet3(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str):  # type: ignore[no-untyped-def]
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        client = fleet.start_coordinator()
        for i in range(3):
            fleet.start_agent(f"cam-{i}", v1)
        fleet.wait_online(client, 3)
        yield fleet, client, v1


def test_a_rollout_reaches_every_device_through_canary_soak_and_waves(
    fleet3, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet, client, v1 = fleet3
    _upload(client, v1, tmp_path)  # the coordinator holds the base: it can build a delta
    v2 = reference_version(tmp_path, fleet.key, 2)
    sha = _upload(client, v2, tmp_path)
    view = client.create_rollout(
        {
            "bundle_sha256": sha,
            "group": "lab",
            "canary": "1",
            "soak_s": 2,
            "halt_if": ["p95_ms>10000"],
            "waves": "50%,100%",
        }
    )
    assert view.counts == {"pending": 3}
    done = _finished(client, view.rollout_id, fleet, 120)
    assert done.state == "completed", done
    assert done.counts == {"active": 3}, done
    want = _manifest_sha(v2, fleet)
    wait_until(lambda: set(_running(client).values()) == {want}, 20, "every device on v2")
    # The archive went to the broker once, then was taken off when nothing needed it.
    bundle = next(b for b in client.bundles() if b.sha256 == sha)
    # Once: the chunks plus the offer (its chunk digests), never a copy per device.
    assert bundle.published_bytes is not None
    assert bundle.size <= bundle.published_bytes < bundle.size + 64 * 1024
    assert bundle.cleared_at is not None
    # v1 devices had the base: they fetched a delta (manifest and signature only: same ONNX).
    deltas = [b for b in client.bundles() if b.kind == "delta"]
    assert deltas and deltas[0].size < bundle.size / 10, deltas
    # ... even though v1 was still their configured bundle, not yet one under bundles/.
    for device in ("cam-0", "cam-1", "cam-2"):

        def installed(device: str = device) -> list[object]:
            events = client.device(device, windows=0, events=100).events
            return [
                e.event.details.get("transfer")
                for e in events
                if e.event.details.get("install_state") == "active"
            ]

        wait_until(lambda: bool(installed()), 30, f"{device}'s installed event")
        assert installed() == ["delta"], (device, installed())


def test_a_broken_halt_rule_rolls_the_canary_back_and_no_one_else_downloads(
    fleet3, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    fleet, client, v1 = fleet3
    v2 = reference_version(tmp_path, fleet.key, 2)
    sha = _upload(client, v2, tmp_path)
    view = client.create_rollout(
        {
            "bundle_sha256": sha,
            "group": "lab",
            "canary": "1",
            "soak_s": 30,
            "halt_if": ["p95_ms>0.001"],
            "waves": "100%",
        }
    )
    done = _finished(client, view.rollout_id, fleet, 120)
    assert done.state == "halted" and "p95_ms" in (done.reason or ""), done
    states = {d.device_id: (d.wave, d.state) for d in done.devices or []}
    canary = [d for d, (wave, _) in states.items() if wave == 0]
    assert len(canary) == 1 and states[canary[0]][1] == "rolled_back", states
    assert all(s == "pending" for d, (w, s) in states.items() if w > 0), states
    old = _manifest_sha(v1, fleet)
    wait_until(lambda: set(_running(client).values()) == {old}, 30, "every device on v1 again")
    # The devices of later waves never heard of v2.
    for device, (wave, _) in states.items():
        if wave > 0:
            events = client.device(device, windows=0, events=100).events
            assert not [e for e in events if "install_state" in e.event.details], device


def test_a_bundle_failing_its_health_check_halts_at_the_canary(fleet3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, client, v1 = fleet3
    bad = broken_golden(v1, tmp_path / "bad", fleet.key, version=2)
    sha = _upload(client, bad, tmp_path)
    view = client.create_rollout(
        {"bundle_sha256": sha, "group": "lab", "canary": "1", "soak_s": 1, "waves": "100%"}
    )
    done = _finished(client, view.rollout_id, fleet, 120)
    assert done.state == "halted", done
    canary = next(d for d in done.devices or [] if d.wave == 0)
    assert canary.state == "failed" and "health check" in (canary.reason or ""), canary
    old = _manifest_sha(v1, fleet)
    assert set(_running(client).values()) == {old}


def test_a_tampered_or_foreign_bundle_is_refused_at_upload(fleet3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, client, _v1 = fleet3
    v2 = reference_version(tmp_path, fleet.key, 2)
    stage = next(p for p in v2.iterdir() if p.suffix == ".onnx")
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0x01
    stage.write_bytes(bytes(data))
    with pytest.raises(ApiError, match=r"HTTP 400.*(sha256|hash)"):
        _upload(client, v2, tmp_path)


def test_a_second_rollout_to_a_busy_group_is_refused(fleet3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet, client, _v1 = fleet3
    sha = _upload(client, reference_version(tmp_path, fleet.key, 2), tmp_path)
    first = client.create_rollout(
        {"bundle_sha256": sha, "group": "lab", "canary": "1", "soak_s": 600, "waves": "100%"}
    )
    with pytest.raises(ApiError, match=r"HTTP 409.*lab"):
        client.create_rollout({"bundle_sha256": sha, "group": "lab", "waves": "100%"})
    with urllib.request.urlopen(f"{client.url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'edgefleet_rollouts{group="lab",state="running"} 1.0' in metrics, metrics
    assert f'edgefleet_rollout_devices{{group="lab",rollout="{first.rollout_id}"' in metrics
    paused = client.rollout_action(first.rollout_id, "pause")
    assert paused.state == "paused"
    aborted = client.rollout_action(first.rollout_id, "abort")
    assert aborted.state == "aborted"
