"""A simulated device's bundles: which variant runs, the one before it, installs and rollbacks.

It answers `install_bundle` and `rollback_bundle` as `agent/update/manager.py` does, and reports
each state with the same event kind, message and details, because the coordinator's rollout
engine (server/rollout/engine.py) moves a device's rollout state from exactly those:

    downloading -> downloading (have/total) -> verifying -> health_checking -> active
                                               \\-> failed (the archive is not what was asked)
    refused (busy, another model, a bundle that is not a configured variant)
    rolled_back (back to the previous variant)

Nothing is downloaded: the stages are spread over `SimConfig.install_s`, then the device
switches to the variant at its default operating point, unpinned, and publishes a new birth.
Like the agent, the birth goes out at the switch and the `active` event right after it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from pydantic import JsonValue

from edgefleet.agent.protocol import EventKind, InstallBundle, RollbackBundle
from edgefleet.agent.update.report import InstallRefused, InstallReporter, InstallState

from .config import SimConfig
from .timers import Timers
from .variants import SimVariant

log = logging.getLogger(__name__)

CHUNKS: Final = 8  # the simulated archive's chunk count (downloading have/total)
# When each stage starts, as a share of install_s.
_HALF_DOWNLOADED: Final = 0.2
_DOWNLOADED: Final = 0.4
_VERIFYING: Final = 0.5
_HEALTH: Final = 0.7
_ROLLBACK: Final = 0.2  # a rollback loads a bundle already on disk: quicker than an install

EventSink = Callable[[EventKind, str, dict[str, Any]], None]


@dataclass
class _Job:
    kind: Literal["install", "rollback"]
    manifest_sha256: str
    rollout_id: str | None
    state: str = "starting"
    have: int = 0
    total: int = 0
    cancelled: bool = False


class Installs:
    """The variants of one simulated device; loop thread only."""

    def __init__(
        self,
        device_id: str,
        cfg: SimConfig,
        timers: Timers,
        device_class: str,
        event: EventSink,
        switched: Callable[[SimVariant], None],
    ) -> None:
        """`event(kind, message, details)` publishes; `switched(v)` runs when v starts running."""
        initial = cfg.variant(cfg.initial_variant or "")
        if initial is None:
            raise ValueError("Installs needs SimConfig.variants and initial_variant")
        self.device_id = device_id
        self.cfg = cfg
        self.timers = timers
        self.device_class = device_class
        self.event = event
        # The agent's own wording of install events (agent/update/report.py): the rollout
        # engine reads them, so a simulated device must say exactly what an agent says.
        self._reports = InstallReporter(
            device_id, lambda kind, message, facts: event(cast(EventKind, kind), message, facts)
        )
        self.switched = switched
        self.running: SimVariant = initial
        self.previous: SimVariant | None = None
        self.job: _Job | None = None

    # -- commands -----------------------------------------------------------------------

    def install(self, cmd: InstallBundle) -> dict[str, JsonValue]:
        """Accept an install (its stages follow as events) or raise InstallRefused naming why."""
        now = self.running
        if cmd.manifest_sha256 == now.manifest_sha256:
            return {"state": "active", "manifest_sha256": now.manifest_sha256, "already": True}
        job = self.job
        if job is not None:
            if job.kind == "install" and job.manifest_sha256 == cmd.manifest_sha256:
                return {"state": job.state, "have": job.have, "total": job.total}
            raise self._refuse(
                cmd, f"busy: {job.kind} of {job.manifest_sha256[:12]} is {job.state}", "busy"
            )
        if cmd.model_id != now.model_id and not cmd.allow_model_change:
            raise self._refuse(
                cmd,
                f"bundle is for model {cmd.model_id!r}, this device runs {now.model_id!r} "
                "(allow_model_change not set)",
                "other_model",
            )
        target = self.cfg.variant(cmd.manifest_sha256)
        if target is None:
            raise self._refuse(
                cmd,
                f"manifest {cmd.manifest_sha256[:12]} is not one of the simulated variants",
                "unknown_variant",
            )
        job = self.job = _Job("install", cmd.manifest_sha256, cmd.rollout_id)
        self._plan_install(job, cmd, target)
        log.info("%s accepted the install of %s", self.device_id, target.label())
        return {"state": "accepted", "manifest_sha256": cmd.manifest_sha256}

    def rollback(self, cmd: RollbackBundle) -> dict[str, JsonValue]:
        """Go back to the previous variant if the one named runs now (idempotent)."""
        now = self.running
        if now.manifest_sha256 != cmd.manifest_sha256:
            return {"rolled_back": False, "running": now.manifest_sha256}
        previous = self.previous
        if previous is None:
            raise ValueError("no previous bundle is installed to roll back to")
        if self.job is not None:
            self.job.cancelled = True  # an install still running for this rollout is abandoned
        job = self.job = _Job("rollback", cmd.manifest_sha256, cmd.rollout_id)
        reason = cmd.reason or "asked by the coordinator"
        self.timers.at(
            time.monotonic() + _ROLLBACK * self.cfg.install_s,
            lambda: self._rolled_back(job, previous, reason),
        )
        return {"rolled_back": True, "to": _slot_name(previous)}

    # -- the stages (loop thread, from Timers) --------------------------------------------

    def _plan_install(self, job: _Job, cmd: InstallBundle, target: SimVariant) -> None:
        t0 = time.monotonic()
        span = self.cfg.install_s
        sha = cmd.delta.sha256 if cmd.delta is not None else cmd.sha256
        kind = "delta" if cmd.delta is not None else "full bundle"

        def step(at: float, fn: Callable[[], None]) -> None:
            def run() -> None:
                if not job.cancelled:
                    fn()

            self.timers.at(t0 + at * span, run)

        step(0.0, lambda: self._set(job, "downloading", cmd, f"fetching the {kind} {sha[:12]}"))
        for at, have in ((_HALF_DOWNLOADED, CHUNKS // 2), (_DOWNLOADED, CHUNKS)):
            step(at, functools.partial(self._progress, job, cmd, have))
        step(_VERIFYING, lambda: self._verify(job, cmd, target))
        step(
            _HEALTH,
            lambda: self._set(job, "health_checking", cmd, "loading and running the golden inputs"),
        )
        step(1.0, lambda: self._activate(job, cmd, target))

    def _progress(self, job: _Job, cmd: InstallBundle, have: int) -> None:
        job.have, job.total = have, CHUNKS
        self._set(job, "downloading", cmd, f"{have}/{CHUNKS} chunks", have=have, total=CHUNKS)

    def _verify(self, job: _Job, cmd: InstallBundle, target: SimVariant) -> None:
        self._set(job, "verifying", cmd, "checking hashes and signature")
        if (target.model_id, target.version) != (cmd.model_id, cmd.version):
            # As the agent finds once the archive is unpacked: not what the command names.
            why = (
                f"{_slot_name(target)}: holds {target.model_id} v{target.version}, "
                f"the command says {cmd.model_id} v{cmd.version}"
            )
            job.cancelled = True
            self._report(
                "failed",
                f"install of {cmd.model_id} v{cmd.version} failed: {why}",
                cmd.rollout_id,
                cmd.manifest_sha256,
                version=cmd.version,
                reason=why[:900],
            )
            self._finish(job)

    def _activate(self, job: _Job, cmd: InstallBundle, target: SimVariant) -> None:
        before = self.running
        self.previous, self.running = before, target
        self._finish(job)
        self.switched(target)  # the new birth goes out before the event, as the agent's
        self._report(
            "active",
            f"installed {target.model_id} v{target.version} (was v{before.version}); "
            "0 frames ran on it",
            cmd.rollout_id,
            cmd.manifest_sha256,
            version=target.version,
            from_version=before.version,
            frames=0,
            device_class=self.device_class,
            latency_min_ms=round(target.point_ms[-1], 3),
            swap_ms=0.0,
            transfer="delta" if cmd.delta is not None else "full",
            chunks_received=CHUNKS,
            chunks_written=CHUNKS,
            duplicates=0,
            bad_chunks=0,
            rerequests=0,
        )

    def _rolled_back(self, job: _Job, previous: SimVariant, reason: str) -> None:
        before = self.running
        self.running, self.previous = previous, None  # as Slots.rollback: no previous left
        self._finish(job)
        self.switched(previous)
        self._report(
            "rolled_back",
            f"rolled back to {previous.model_id} v{previous.version} ({reason})",
            job.rollout_id,
            previous.manifest_sha256,
            version=previous.version,
            from_version=before.version,
            swap_ms=0.0,
        )

    # -- bookkeeping ----------------------------------------------------------------------

    def _set(
        self, job: _Job, state: InstallState, cmd: InstallBundle, message: str, **details: Any
    ) -> None:
        job.state = state
        self._reports.step(state, cmd, message, cmd.sha256, **details)

    def _report(
        self,
        state: InstallState,
        message: str,
        rollout_id: str | None,
        manifest_sha256: str,
        **details: Any,
    ) -> None:
        self._reports.report(state, message, rollout_id, manifest_sha256, **details)

    def _refuse(self, cmd: InstallBundle, why: str, reason: str) -> InstallRefused:
        return self._reports.refuse(cmd, why, reason)

    def _finish(self, job: _Job) -> None:
        if self.job is job:
            self.job = None


def _slot_name(v: SimVariant) -> str:
    """The bundle's directory name on an agent (agent/update/slots.py)."""
    return f"{v.model_id}-v{v.version}-{v.manifest_sha256[:12]}"
