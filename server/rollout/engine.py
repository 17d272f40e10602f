"""The rollout state machine: publish once, canaries, soak, waves, halt and roll back.

Everything it knows is in the store (rollouts, rollout_devices, the devices' events, statuses
and telemetry), and each `tick` reads it afresh and writes what changed: a coordinator killed
at any moment and started again goes on where the store says the rollout was. Commands are
idempotent on the device (an install of the bundle already running or already being fetched
answers with its state), so sending one again after a restart or a lost reply is harmless.

Phases of a running rollout: `publish` (the archive and its deltas go to the broker, once) ->
`wave 0` (the canaries) -> `soak` (their telemetry is judged by the halt rules for soak_s) ->
`wave 1` .. `wave n` -> completed. A halt rule broken at any time after a device activated,
a failed canary, or more failures in a wave than max_failed allows, halts the rollout: no
device is sent anything more, and every device this rollout activated is sent
`rollback_bundle` until it reports `rolled_back` (phase `rolling back`, then `done`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from edgefleet.agent.protocol import InstallBundle, RollbackBundle, Telemetry
from edgefleet.agent.protocol.commands import AnyCommand, DeltaRef
from edgefleet.server.fleet.store.base import (
    BundleRecord,
    EventRecord,
    RolloutDeviceRecord,
    RolloutDeviceState,
    RolloutRecord,
    RolloutState,
    Store,
)
from edgefleet.server.rollout.archives import ArchiveInfo, ArchiveStore
from edgefleet.server.rollout.plan import parse_canary, parse_waves, plan
from edgefleet.server.rollout.publisher import choose_chunk_size
from edgefleet.server.rollout.rules import evaluate, parse_rule
from edgefleet.server.rollout.spec import RolloutSpec

log = logging.getLogger(__name__)

IN_FLIGHT = frozenset({"sent", "downloading", "verifying", "health_checking"})
FAILED = frozenset({"failed", "refused", "timed_out"})
TERMINAL = FAILED | {"active", "rolled_back"}
_FROM_EVENT: dict[str, RolloutDeviceState] = {
    "downloading": "downloading",
    "verifying": "verifying",
    "health_checking": "health_checking",
    "active": "active",
    "failed": "failed",
    "refused": "refused",
    "rolled_back": "rolled_back",
}
# A refusal for one of these reasons is the device saying "not now", not "never".
_TRANSIENT_REFUSALS = frozenset({"busy"})


class RolloutError(ValueError):
    """A rollout cannot be created as asked; the message says why."""


class Sender(Protocol):
    """Publishes a command to one device without waiting for its reply."""

    def command(self, device_id: str, body: AnyCommand, expires_s: float) -> str: ...


class Publisher(Protocol):
    """Puts an archive on the broker as retained chunks, or takes it off."""

    def publish(self, info: ArchiveInfo) -> int: ...

    def clear(self, info: ArchiveInfo) -> None: ...

    def generation(self) -> int: ...

    def present(self, info: ArchiveInfo) -> bool: ...


@dataclass(frozen=True)
class EngineSettings:
    """How often things are retried."""

    resend_s: float = 30.0  # an in-flight device silent this long is sent its command again
    command_expires_s: float = 120.0


def new_rollout_id(now: float) -> str:
    """r-YYYYmmdd-HHMMSS-xxxx: sortable, readable, unique enough for one coordinator."""
    return time.strftime("r-%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{secrets.token_hex(2)}"


class RolloutEngine:
    """Drives every rollout of the store one step per tick."""

    def __init__(
        self,
        store: Store,
        archives: ArchiveStore,
        sender: Sender,
        publisher: Publisher,
        *,
        settings: EngineSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.archives = archives
        self.sender = sender
        self.publisher = publisher
        self.settings = settings or EngineSettings()
        self.clock = clock
        self._last_sent: dict[tuple[str, str], float] = {}
        # archive sha256 -> publisher generation at which it was last seen on the broker.
        self._checked: dict[str, int] = {}

    # -- creating -----------------------------------------------------------------------------

    def create(
        self,
        group: str,
        bundle_sha256: str,
        spec: RolloutSpec,
        devices: Iterable[str] | None = None,
    ) -> str:
        """Plan and store a rollout of an uploaded bundle to a group; returns its id.

        devices: only these members of the group (the closed loop moves the devices that
        missed their target, not the whole group); the rollout still holds the group.
        """
        info = self.archives.get(bundle_sha256)
        if info is None:
            raise RolloutError(f"no bundle {bundle_sha256} on this coordinator (upload it first)")
        members = self.store.devices(group)
        if devices is not None:
            wanted = set(devices)
            members = [d for d in members if d.device_id in wanted]
            if len(members) != len(wanted):
                missing = sorted(wanted - {d.device_id for d in members})
                raise RolloutError(f"not in group {group!r}: {', '.join(missing[:5])}")
        if not members:
            raise RolloutError(f"group {group!r} has no devices")
        now = self.clock()
        rollout_id = new_rollout_id(now)
        deltas: dict[str, str] = {}
        bases = {
            d.status.bundle_sha256
            for d in members
            if d.status is not None
            and d.status.bundle_sha256 is not None
            and d.status.bundle_sha256 != info.manifest_sha256
        }
        for base in sorted(bases):
            delta = self.archives.delta(info, base)
            if delta is not None and delta.sha256 != info.sha256:
                deltas[base] = delta.sha256
                self.store.add_bundle(_bundle_record(delta, now))
        spec = spec.model_copy(update={"deltas": deltas})
        online = {d.device_id for d in members if d.online}
        waves = plan(
            sorted(d.device_id for d in members),
            parse_canary(spec.canary),
            parse_waves(spec.waves),
            seed=rollout_id,
            online=online,
        )
        self.store.add_bundle(_bundle_record(info, now))
        self.store.create_rollout(
            RolloutRecord(
                rollout_id=rollout_id,
                group=group,
                bundle_sha256=info.sha256,
                manifest_sha256=info.manifest_sha256,
                model_id=info.model_id,
                version=info.version,
                spec_json=spec.model_dump_json(),
                state="running",
                phase="publish",
                phase_started_at=now,
                reason=None,
                created_at=now,
                updated_at=now,
            ),
            waves,
        )
        log.info(
            "rollout %s: %s v%d to group %s: %d device(s) in %d wave(s), %d delta(s)",
            rollout_id,
            info.model_id,
            info.version,
            group,
            len(members),
            len(waves),
            len(deltas),
        )
        return rollout_id

    # -- operator actions ---------------------------------------------------------------------

    def pause(self, rollout_id: str) -> None:
        """No new device gets the bundle; those under way go on."""
        self._require(rollout_id, {"running"}, "pause")
        self.store.update_rollout(rollout_id, state="paused", reason="paused by the operator")

    def resume(self, rollout_id: str) -> None:
        """Go on from where it was paused."""
        self._require(rollout_id, {"paused"}, "resume")
        self.store.update_rollout(rollout_id, state="running", reason="resumed by the operator")

    def abort(self, rollout_id: str) -> None:
        """Stop, and roll back every device this rollout activated."""
        self._require(rollout_id, {"running", "paused"}, "abort")
        self._halt(rollout_id, "aborted", "aborted by the operator")

    def _require(self, rollout_id: str, states: set[str], action: str) -> None:
        r = self.store.rollout(rollout_id)
        if r is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        if r.state not in states:
            raise RolloutError(f"cannot {action} rollout {rollout_id}: it is {r.state}")

    # -- the loop -------------------------------------------------------------------------------

    def tick(self) -> None:
        """One step of every rollout that is not finished."""
        for r in self.store.rollouts(states=["running", "paused", "halted", "aborted"]):
            if r.state in ("halted", "aborted") and r.phase == "done":
                continue
            try:
                self._step(r.rollout_id)
            except Exception:  # one broken rollout must not stop the others
                log.exception("rollout %s: step failed; retrying at the next tick", r.rollout_id)

    def _step(self, rollout_id: str) -> None:
        r = self.store.rollout(rollout_id)
        if r is None:
            return
        spec = RolloutSpec.model_validate_json(r.spec_json)
        now = self.clock()
        if r.phase == "publish":
            self._publish(r.rollout_id, r.bundle_sha256, spec)
            self.store.update_rollout(rollout_id, phase="wave 0", phase_started_at=now)
            return
        self._track(r, now)
        if r.state in ("halted", "aborted"):
            self._roll_back(r, now)
            return
        self._ensure_on_broker(r, spec)
        devices = self.store.rollout_devices(rollout_id)
        verdict = self._judge(r, spec, [d for d in devices if d.state == "active"], now)
        if verdict is not None:
            self._halt(rollout_id, "halted", verdict)
            return
        if r.phase == "soak":
            self._soak(r, spec, devices, now)
            return
        wave = int(r.phase.split()[1]) if r.phase.startswith("wave ") else None
        if wave is None:
            return
        members = [d for d in devices if d.wave == wave]
        if r.state == "running":
            self._send_installs(r, spec, members, now)
        self._resend(r, spec, members, now)
        if not all(
            d.state in TERMINAL for d in self.store.rollout_devices(rollout_id) if d.wave == wave
        ):
            return
        members = [d for d in self.store.rollout_devices(rollout_id) if d.wave == wave]
        failed = [d for d in members if d.state in FAILED or d.state == "rolled_back"]
        if wave == 0 and failed:
            d = failed[0]
            self._halt(rollout_id, "halted", f"canary {d.device_id} {d.state}: {d.reason or ''}")
            return
        if members and len(failed) / len(members) > spec.max_failed:
            self._halt(
                rollout_id,
                "halted",
                f"{len(failed)} of {len(members)} devices of wave {wave} failed "
                f"(max_failed {spec.max_failed:.0%}); first: {failed[0].device_id}: "
                f"{failed[0].reason or failed[0].state}",
            )
            return
        last = max(d.wave for d in devices)
        if wave == 0 and spec.soak_s > 0:
            self.store.update_rollout(rollout_id, phase="soak", phase_started_at=now)
        elif wave < last:
            self.store.update_rollout(rollout_id, phase=f"wave {wave + 1}", phase_started_at=now)
        else:
            # Off the broker first: a crash in between completes again and finds it cleared.
            self._clear(r, spec)
            self.store.update_rollout(
                rollout_id,
                state="completed",
                phase="done",
                phase_started_at=now,
                reason=f"{sum(d.state == 'active' for d in devices)} active, "
                f"{len(failed)} failed in the last wave",
            )

    def _soak(
        self, r: RolloutRecord, spec: RolloutSpec, devices: list[RolloutDeviceRecord], now: float
    ) -> None:
        rid = r.rollout_id
        # A canary that went back after activating (its trial crashed the agent, a local
        # health failure) is as much a verdict as one that never activated.
        lost = [
            d for d in devices if d.wave == 0 and (d.state in FAILED or d.state == "rolled_back")
        ]
        if lost:
            d = lost[0]
            self._halt(
                rid, "halted", f"canary {d.device_id} {d.state} in the soak: {d.reason or ''}"
            )
            return
        started = r.phase_started_at or now
        if now - started < spec.soak_s:
            return
        canaries = [d for d in devices if d.wave == 0 and d.state == "active"]
        if spec.halt_if:
            rules = [parse_rule(x) for x in spec.halt_if]
            after, before, errors = self._windows(r, canaries)
            verdict = evaluate(rules, after, before, errors)
            if verdict.state == "insufficient":
                self._halt(rid, "halted", f"soak over without enough telemetry: {verdict.reason}")
                return
        self.store.update_rollout(rid, phase="wave 1", phase_started_at=now)

    # -- devices ----------------------------------------------------------------------------

    def _install_command(
        self, r: RolloutRecord, spec: RolloutSpec, device_id: str
    ) -> InstallBundle:
        delta = None
        dev = self.store.device(device_id)
        base = dev.status.bundle_sha256 if dev is not None and dev.status is not None else None
        if base is not None and base in spec.deltas:
            delta = DeltaRef(sha256=spec.deltas[base], base_manifest_sha256=base)
        return InstallBundle(
            sha256=r.bundle_sha256,
            model_id=r.model_id,
            version=r.version,
            manifest_sha256=r.manifest_sha256,
            delta=delta,
            rollout_id=r.rollout_id,
            allow_model_change=spec.allow_model_change,
        )

    def _send_installs(
        self, r: RolloutRecord, spec: RolloutSpec, members: list[RolloutDeviceRecord], now: float
    ) -> None:
        rid = r.rollout_id
        for d in members:
            if d.state != "pending":
                continue
            dev = self.store.device(d.device_id)
            previous = dev.status.bundle_sha256 if dev and dev.status else None
            self.sender.command(
                d.device_id,
                self._install_command(r, spec, d.device_id),
                self.settings.command_expires_s,
            )
            self._last_sent[(rid, d.device_id)] = now
            self.store.update_rollout_device(
                rid,
                d.device_id,
                state="sent",
                sent_at=now,
                deadline_at=now + spec.device_deadline_s,
                previous_manifest_sha256=previous,
            )

    def _resend(
        self, r: RolloutRecord, spec: RolloutSpec, members: list[RolloutDeviceRecord], now: float
    ) -> None:
        """Again to in-flight devices that went quiet (offline at the time, reply lost)."""
        rid = r.rollout_id
        for d in members:
            if d.state not in IN_FLIGHT:
                continue
            last = max(self._last_sent.get((rid, d.device_id), 0.0), d.updated_at or 0.0)
            if now - last < self.settings.resend_s:
                continue
            dev = self.store.device(d.device_id)
            if dev is None or not dev.online:
                continue
            self.sender.command(
                d.device_id,
                self._install_command(r, spec, d.device_id),
                self.settings.command_expires_s,
            )
            self._last_sent[(rid, d.device_id)] = now

    def _track(self, r: RolloutRecord, now: float) -> None:
        """Move each device's state on from its newest events and its status."""
        rid = r.rollout_id
        manifest = r.manifest_sha256
        for d in self.store.rollout_devices(rid):
            if d.state == "pending":
                continue
            if d.state in IN_FLIGHT and d.deadline_at is not None and now > d.deadline_at:
                self.store.update_rollout_device(
                    rid,
                    d.device_id,
                    state="timed_out",
                    reason=f"not active within the device deadline (was {d.state})",
                )
                continue
            latest = _latest_install_event(self.store.events(d.device_id, limit=50), rid, manifest)
            if latest is not None:
                facts = latest.event.details
                state = _FROM_EVENT.get(str(facts.get("install_state")))
                reason = facts.get("reason")
                if state == "refused" and reason in _TRANSIENT_REFUSALS:
                    state = None
                have = facts.get("have")
                # Only events that carry a count move it (verifying, active... carry none):
                # a rewrite at every tick would keep updated_at fresh, and _resend reads a
                # device whose updated_at never ages as one that is not silent.
                moved = isinstance(have, int) and have != d.have
                if d.state == "active" and state in IN_FLIGHT:
                    # The status already showed this manifest running; an install event
                    # that arrives after it (events and status travel apart) is older news.
                    state = None
                if state is not None and (state != d.state or moved):
                    total = facts.get("total")
                    self.store.update_rollout_device(
                        rid,
                        d.device_id,
                        state=state,
                        have=have if isinstance(have, int) else None,
                        total=total if isinstance(total, int) else None,
                        reason=latest.event.message if state in FAILED | {"rolled_back"} else None,
                    )
                    continue
            if d.state in IN_FLIGHT:
                dev = self.store.device(d.device_id)
                if (
                    dev is not None
                    and dev.status is not None
                    and (dev.status.bundle_sha256 == manifest and dev.online)
                ):
                    self.store.update_rollout_device(rid, d.device_id, state="active")

    def _judge(
        self, r: RolloutRecord, spec: RolloutSpec, active: list[RolloutDeviceRecord], now: float
    ) -> str | None:
        """A halt reason when the active devices' telemetry breaks a rule, else None."""
        if not spec.halt_if or not active:
            return None
        rules = [parse_rule(x) for x in spec.halt_if]
        after, before, errors = self._windows(r, active)
        verdict = evaluate(rules, after, before, errors)
        return verdict.reason if verdict.state == "breached" else None

    def _windows(
        self, r: RolloutRecord, devices: Iterable[RolloutDeviceRecord]
    ) -> tuple[list[Telemetry], list[Telemetry], int]:
        """Windows on the new version, windows before the rollout, error events since."""
        created = r.created_at
        version = r.version
        model_id = r.model_id
        after: list[Telemetry] = []
        before: list[Telemetry] = []
        errors = 0
        for d in devices:
            device_id = d.device_id
            for rec in self.store.telemetry(device_id, limit=200):
                t = rec.telemetry
                if (
                    t.model_version == version
                    and t.model_id == model_id
                    and (t.window_start >= created)
                ):
                    after.append(t)
                elif t.window_end <= created:
                    before.append(t)
            for ev in self.store.events(device_id, limit=100):
                if (
                    ev.event.kind == "error"
                    and ev.event.ts >= created
                    and ("install_state" not in ev.event.details)
                ):
                    errors += 1
        return after, before, errors

    # -- halting ----------------------------------------------------------------------------

    def _halt(self, rollout_id: str, state: RolloutState, reason: str) -> None:
        log.warning("rollout %s %s: %s", rollout_id, state, reason)
        self.store.update_rollout(
            rollout_id,
            state=state,
            phase="rolling back",
            phase_started_at=self.clock(),
            reason=reason[:1000],
        )
        r = self.store.rollout(rollout_id)
        if r is not None:
            self._roll_back(r, self.clock(), force=True)

    def _roll_back(self, r: RolloutRecord, now: float, force: bool = False) -> None:
        rid = r.rollout_id
        manifest = r.manifest_sha256
        reason = r.reason or "rollout halted"
        waiting = False
        for d in self.store.rollout_devices(rid):
            if d.state not in ("active", *IN_FLIGHT):
                continue
            if d.state in IN_FLIGHT and d.deadline_at is not None and now > d.deadline_at:
                continue
            waiting = True
            last = self._last_sent.get((rid, d.device_id), 0.0)
            if not force and now - last < self.settings.resend_s:
                continue
            self.sender.command(
                d.device_id,
                RollbackBundle(manifest_sha256=manifest, rollout_id=rid, reason=reason[:500]),
                self.settings.command_expires_s,
            )
            self._last_sent[(rid, d.device_id)] = now
        if not waiting:
            self._clear(r, RolloutSpec.model_validate_json(r.spec_json))
            self.store.update_rollout(rid, phase="done", phase_started_at=now)

    # -- the broker's copy ------------------------------------------------------------------

    def _publish(self, rollout_id: str, sha256: str, spec: RolloutSpec) -> None:
        for sha in (sha256, *spec.deltas.values()):
            info = self.archives.get(sha)
            if info is None:
                raise RolloutError(f"bundle archive {sha} is missing from the coordinator")
            rec = self.store.bundle(sha)
            if rec is not None and rec.published_at is not None and rec.cleared_at is None:
                continue  # already on the broker (another rollout, or before a restart)
            sent = self.publisher.publish(info)
            self.store.mark_bundle_published(sha, self.clock(), sent)
            self._checked[sha] = self.publisher.generation()
            log.info("rollout %s: published %s (%d bytes)", rollout_id, sha[:12], sent)

    def _ensure_on_broker(self, r: RolloutRecord, spec: RolloutSpec) -> None:
        """After a broker (or coordinator) restart, publish again what the broker lost.

        A broker killed between two saves of its persistence file loses the retained
        messages of that interval; devices would wait for chunks that never come. Checked
        once per broker session and archive: the offer's presence is enough (see
        MqttPublisher.present).
        """
        generation = self.publisher.generation()
        for sha in (r.bundle_sha256, *spec.deltas.values()):
            if self._checked.get(sha) == generation:
                continue
            info = self.archives.get(sha)
            rec = self.store.bundle(sha)
            if info is None or rec is None:
                continue
            if not self.publisher.present(info):
                sent = self.publisher.publish(info)
                total = rec.published_bytes + sent
                self.store.mark_bundle_published(sha, self.clock(), total)
                log.warning(
                    "rollout %s: the broker had lost %s; published again (%d bytes)",
                    r.rollout_id,
                    sha[:12],
                    sent,
                )
            self._checked[sha] = generation

    def _clear(self, r: RolloutRecord, spec: RolloutSpec) -> None:
        """Take r's archives off the broker unless another unfinished rollout needs them."""
        busy: set[str] = set()
        for other in self.store.rollouts(states=["running", "paused"]):
            if other.rollout_id == r.rollout_id:
                continue
            other_spec = RolloutSpec.model_validate_json(other.spec_json)
            busy.update((other.bundle_sha256, *other_spec.deltas.values()))
        for sha in (r.bundle_sha256, *spec.deltas.values()):
            rec = self.store.bundle(sha)
            if sha in busy or rec is None or rec.published_at is None or rec.cleared_at:
                continue
            info = self.archives.get(sha)
            if info is not None:
                self.publisher.clear(info)
            self.store.mark_bundle_cleared(sha, self.clock())


def _bundle_record(info: ArchiveInfo, now: float) -> BundleRecord:
    return BundleRecord(
        sha256=info.sha256,
        kind=info.kind,
        manifest_sha256=info.manifest_sha256,
        base_manifest_sha256=info.base_manifest_sha256,
        model_id=info.model_id,
        version=info.version,
        size=info.size,
        chunk_size=choose_chunk_size(info.size),
        path=str(info.path),
        added_at=now,
    )


def _latest_install_event(
    events: list[EventRecord], rollout_id: str, manifest_sha256: str
) -> EventRecord | None:
    """The newest install event of this rollout (events come newest first)."""
    for rec in events:
        facts = rec.event.details
        if "install_state" not in facts:
            continue
        if facts.get("rollout_id") == rollout_id or facts.get("manifest_sha256") == manifest_sha256:
            return rec
    return None
