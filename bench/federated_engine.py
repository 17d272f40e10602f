"""bench.federated's coordinator: our RoundEngine and RolloutEngine on a real store, in process.

Everything but the broker is the real coordinator: a SQLite store, the archive store, the
round engine (announce, judge, close, norm bound, aggregate, evaluate, sign the candidate,
add it to the archives, create its rollout, which builds the delta against the base) and the
rollout engine. The broker is replaced by in-memory fakes: the retained task is read straight
from the fake, updates go into the store through Store.ingest as the ingestor writes them, and
an install command makes the device report the new bundle as running at once (its status),
which the rollout engine then sees as active. No MQTT, no agent process: the devices are the
bench's simulated ones (bench.federated_data), training with the agent's local_update.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle import VerifiedBundle, verify_bundle
from edgefleet.agent.federated.local import RunningBundle
from edgefleet.agent.protocol import FedTask, FedUpdate, Hardware, Status
from edgefleet.agent.protocol.codec import encode
from edgefleet.agent.protocol.commands import AnyCommand, InstallBundle
from edgefleet.server.federated.rounds import RoundEngine
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.fleet.store import FedUpdateIn, IngestBatch, StatusIn, open_store
from edgefleet.server.keystore import FleetKey
from edgefleet.server.rollout.archives import ArchiveInfo, ArchiveStore
from edgefleet.server.rollout.engine import EngineSettings, RolloutEngine

GROUP = "bench"
MAX_TICKS = 50


class Broker:
    """The broker as both engines see it: retained tasks and bundle offers, in memory."""

    def __init__(self) -> None:
        self.tasks: dict[str, FedTask] = {}
        self.offers: set[str] = set()

    def publish_task(self, task: FedTask) -> None:
        self.tasks[task.round_id] = task

    def clear_task(self, round_id: str) -> None:
        self.tasks.pop(round_id, None)

    def generation(self) -> int:
        return 1

    def publish(self, info: ArchiveInfo) -> int:
        self.offers.add(info.sha256)
        return info.size

    def clear(self, info: ArchiveInfo) -> None:
        self.offers.discard(info.sha256)

    def present(self, info: ArchiveInfo) -> bool:
        return info.sha256 in self.offers


class SimClock:
    """Wall time plus a jump: a round whose sat-out devices never report closes at its
    deadline, which the bench reaches by moving this clock, not by waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Installs:
    """The rollout engine's commands: each install is queued, then reported as done."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, InstallBundle]] = []
        self.sent = 0

    def command(self, device_id: str, body: AnyCommand, expires_s: float) -> str:
        if isinstance(body, InstallBundle):
            self.queued.append((device_id, body))
        self.sent += 1
        return f"bench-{self.sent}"


@dataclass
class RoundOutcome:
    """What one round did: its state, why, its figures, the new bundle and what it cost."""

    round_id: str
    state: str
    reason: str | None
    figures: dict[str, Any]
    bundle: VerifiedBundle | None  # the published version + 1, None when the round failed
    seconds: float  # create -> done (local training included, installs not)
    local_s: float  # the devices' local_update calls, one after another
    expected: int  # devices the round expected (those that sat out never report)
    updates: list[FedUpdate] = field(default_factory=list)
    statuses: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    delta_bytes: int | None = None  # the rollout's heads-only delta archive
    archive_bytes: int | None = None  # the full archive of the new version
    message_bytes: list[int] = field(default_factory=list)  # each update's MQTT payload


class Coordinator:
    """One coordinator, one group of devices on one bundle, rounds one after another."""

    def __init__(self, work: Path, key: FleetKey, base: Path, device_ids: list[str]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.store = open_store(str(work / "fleet.db"))
        self.archives = ArchiveStore(work / "archives", [key.public])
        self.broker = Broker()
        self.installs = Installs()
        self.clock = SimClock()
        self.rollouts = RolloutEngine(
            self.store,
            self.archives,
            self.installs,
            self.broker,
            settings=EngineSettings(resend_s=1e6),
            clock=self.clock,
        )
        # No held-out set on the coordinator: it has no labelled frames from the devices'
        # scenes, so the devices' own validation figures decide (evaluate.verdict).
        self.engine = RoundEngine(
            self.store,
            self.archives,
            self.rollouts,
            self.broker,
            work_dir=work / "fed",
            signing_key=key.private,
            holdout=None,
            clock=self.clock,
        )
        self.current = verify_bundle(base, [key.public])
        self.archives.add(base)
        self.device_ids = list(device_ids)
        self._boot = "3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b"
        self._report(self.device_ids, self.current)

    def _report(self, devices: list[str], verified: VerifiedBundle) -> None:
        """Each device's status says it runs this bundle (what an agent sends after a swap)."""
        m = verified.manifest
        now = self.clock()
        statuses = [
            StatusIn(
                now,
                Status(
                    device_id=d,
                    online=True,
                    ts=now,
                    agent_version="bench",
                    model_id=m.model_id,
                    model_version=m.version,
                    operating_point=m.default_operating_point,
                    group=GROUP,
                    hardware=Hardware(machine="x86_64", system="Linux", cpu_count=2, ram_mb=1024.0),
                    boot_id=self._boot,
                    bundle_sha256=verified.manifest_sha256,
                ),
            )
            for d in devices
        ]
        self.store.ingest(IngestBatch(statuses=statuses))

    def round(
        self,
        spec: RoundSpec,
        contribute: Callable[[FedTask, RunningBundle], list[FedUpdate]],
        running: Callable[[VerifiedBundle], RunningBundle],
    ) -> RoundOutcome:
        """Create a round, let the devices contribute, drive it to its end, install the result."""
        t0 = time.perf_counter()
        rid = self.engine.create(spec)
        self.engine.tick()  # announce: the task goes out retained
        task = self.broker.tasks[rid]
        t1 = time.perf_counter()
        updates = contribute(task, running(self.current))
        local_s = time.perf_counter() - t1
        now = self.clock()
        self.store.ingest(IngestBatch(fed_updates=[FedUpdateIn(now, u) for u in updates]))
        self.engine.tick()  # judges the updates; closes the round if every device reported
        r = self.store.fed_round(rid)
        assert r is not None
        if r.phase == "collect":  # a device sat out (too few examples): wait for the deadline
            self.clock.offset += max(0.0, r.deadline_at - self.clock()) + 1.0
        for _ in range(MAX_TICKS):
            r = self.store.fed_round(rid)
            assert r is not None
            if r.state != "running":
                break
            self.engine.tick()
        seconds = time.perf_counter() - t0
        r = self.store.fed_round(rid)
        assert r is not None
        outcome = RoundOutcome(
            round_id=rid,
            state=r.state,
            reason=r.reason,
            figures=json.loads(r.figures_json or "{}"),
            bundle=None,
            seconds=seconds,
            local_s=local_s,
            expected=len(r.expected),
            updates=updates,
            statuses={u.device_id: (u.status, u.reason) for u in self.store.fed_updates(rid)},
            message_bytes=[len(encode(u)) for u in updates],
        )
        if r.state == "done" and r.result_path and r.rollout_id:
            outcome.bundle = verify_bundle(Path(r.result_path), [self.key.public])
            outcome.delta_bytes, outcome.archive_bytes = self._sizes(r.rollout_id)
            self._install(r.rollout_id, outcome.bundle)
            self.current = outcome.bundle
        return outcome

    def _sizes(self, rollout_id: str) -> tuple[int | None, int | None]:
        rollout = self.store.rollout(rollout_id)
        if rollout is None:
            return None, None
        info = self.archives.get(rollout.bundle_sha256)
        deltas = json.loads(rollout.spec_json).get("deltas", {})
        delta = self.archives.get(deltas[self.current.manifest_sha256]) if deltas else None
        return (delta.size if delta else None), (info.size if info else None)

    def _install(self, rollout_id: str, bundle: VerifiedBundle) -> None:
        """Tick the rollout to completion, every device installing what it is told at once."""
        for _ in range(MAX_TICKS):
            self.rollouts.tick()
            if self.installs.queued:
                devices = [d for d, _ in self.installs.queued]
                self.installs.queued.clear()
                self._report(devices, bundle)
            r = self.store.rollout(rollout_id)
            if r is not None and r.state == "completed":
                return
        r = self.store.rollout(rollout_id)
        raise RuntimeError(f"rollout {rollout_id} did not complete: {r}")


def rollout_spec() -> dict[str, Any]:
    """Canary 1, no soak, the rest at once: the bench installs instantly, nothing to watch."""
    return {"canary": "1", "soak_s": 0, "waves": "100%"}


def base_spec(**fields: Any) -> RoundSpec:
    """A RoundSpec for the bench's group with the given fields (the rest the defaults)."""
    return RoundSpec.model_validate({"group": GROUP, "rollout": rollout_spec(), **fields})
