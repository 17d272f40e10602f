"""A local fleet for federated rounds end to end: every part real, nothing played by the test.

A private mosquitto, the coordinator service in-process (HTTP API, ingest, rollout and round
engines, SQLite store) holding the fleet's signing key and the reference test split as its
held-out set, and agents as `edgefleet.agent run` processes on the reference video with
`[federated]` on. The agents start on the shared early-exit bundle (v1) and the base, its
skewed v2 (test_agent_support.py: exit 0 never says 5-9), is rolled out to them first: a
round has something to repair, the coordinator holds the base and every device has it
installed, which is what a delta is built on and filled from.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.bundle import Manifest, pack, verify_bundle
from edgefleet.agent.protocol import Event
from edgefleet.server.federated.client import RoundClient
from edgefleet.server.federated.views import RoundView
from edgefleet.server.keystore import PRIVATE_NAME, FleetKey
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.reference import load_reference_split
from edgefleet.server.rollout.views import RolloutView
from tests.rollout.fleet import TOKEN, LocalFleet, local_fleet, start_coordinator_with

from .test_agent_support import exits_bundle, skewed_bundle

# Every frame probed at full depth: a device has a round's examples about 5 s after it
# switched to the base (a new bundle starts empty buffers).
FED = "[federated]\nenabled = true\nprobe_every = 1\n"
# probe_every at its maximum: one probe in the first frame and none for an hour, so this
# device never has a round's examples; it waits for them, certain not to have sent an update.
STARVED = "[federated]\nenabled = true\nprobe_every = 100000\n"
# One canary, then the whole group (no soak).
QUICK_ROLLOUT = {"canary": "1", "soak_s": 0, "waves": "100%"}
# The round: exit 0, the skewed head, trained on at least 100 of each device's own frames
# labelled by its final head (what repairs it in test_agent_worker.py); quorum 2 of 3.
ROUND: dict[str, object] = {
    "group": "lab",
    "heads": [0],
    "labels": "pseudo",
    "min_samples": 100,
    "local_epochs": 10,
    "learning_rate": 0.3,
    "quorum": "2",
    "rollout": QUICK_ROLLOUT,
}


@dataclass
class FedFleet:
    """The fleet, an API client and the base every agent runs when a test begins."""

    fleet: LocalFleet
    client: RoundClient
    base: Path
    base_manifest: Manifest
    base_manifest_sha256: str

    @property
    def key(self) -> FleetKey:
        return self.fleet.key

    def round_done(self, round_id: str, timeout: float) -> RoundView:
        """Wait for the round to leave 'running'; its view with every update."""
        wait_until(
            lambda: self.client.round(round_id).state != "running",
            timeout,
            f"round {round_id} to end",
            detail=lambda: self._round_detail(round_id),
        )
        return self.client.round(round_id)

    def rollout_where(
        self, rollout_id: str, what: str, pred: Callable[[RolloutView], bool], timeout: float
    ) -> RolloutView:
        """Wait until pred(view) holds for the rollout; its last view."""
        box: dict[str, RolloutView] = {}

        def holds() -> bool:
            box["v"] = self.client.rollout(rollout_id)
            return pred(box["v"])

        wait_until(
            holds,
            timeout,
            f"rollout {rollout_id}: {what}",
            detail=lambda: f"{box.get('v')}\n{self.fleet.logs()}",
        )
        return box["v"]

    def running(self) -> dict[str, str | None]:
        """device -> manifest sha256 of the bundle its status says it runs."""
        return {d.device_id: d.bundle_sha256 for d in self.client.devices("lab")}

    def events(self, device_id: str, kind: str) -> list[Event]:
        """The device's events of one kind the coordinator stored, oldest first."""
        detail = self.client.device(device_id, windows=0, events=200)
        return sorted((e.event for e in detail.events if e.event.kind == kind), key=lambda e: e.ts)

    def _round_detail(self, round_id: str) -> str:
        view = json.dumps(self.client.round(round_id).model_dump(mode="json"))[:3000]
        return f"{view}\n{self.fleet.logs()}"


@contextlib.contextmanager
def fed_fleet(
    tmp_path: Path,
    factory: pytest.TempPathFactory,
    broker: MosquittoBroker,
    topic_root: str,
    agents: Mapping[str, str],
) -> Iterator[FedFleet]:
    """The coordinator with the fleet key and the held-out set, and one agent per `agents`
    entry (device id -> its [federated] section) in group 'lab', started on v1 and running
    the base (v2) once the rollout that brought it there completed."""
    first, _ = exits_bundle(factory)
    bundle, key = skewed_bundle(factory)
    verified = verify_bundle(bundle, [key.public])
    holdout = tmp_path / "holdout.npz"
    images, labels = load_reference_split()["test"]
    np.savez(holdout, images=images, labels=labels)
    with local_fleet(tmp_path, broker, topic_root) as fleet:
        fleet.key = key  # the bundles' signer: agents trust it, the coordinator signs with it
        start_coordinator_with(
            fleet,
            signing_key=key.directory / PRIVATE_NAME,
            fed_holdout=holdout,
            # A device back from the dead gets its install again within seconds.
            rollout_resend_s=2.0,
        )
        assert fleet.coordinator is not None
        client = RoundClient(fleet.coordinator.url, TOKEN)
        for device_id, fed in agents.items():
            fleet.start_agent(device_id, first, extra=fed)
        fleet.wait_online(client, len(agents))
        ff = FedFleet(fleet, client, bundle, verified.manifest, verified.manifest_sha256)
        # The base reaches the devices the way bundles do in a fleet, through a rollout, so it
        # is an installed version on each (what a delta is built on) and held by the
        # coordinator (what a round starts from).
        base = client.upload_bundle(pack(bundle, tmp_path / "base.tar.gz").read_bytes())
        rollout = client.create_rollout(
            {"bundle_sha256": base.sha256, "group": "lab", **QUICK_ROLLOUT}
        )
        done = ff.rollout_where(rollout.rollout_id, "done", lambda v: v.phase == "done", 120)
        assert done.state == "completed", done
        wait_until(
            lambda: set(ff.running().values()) == {verified.manifest_sha256},
            20,
            "every agent on the base",
        )
        yield ff
