"""The federated round state machine: announce, collect, aggregate and evaluate, publish.

Everything it knows is in the store (fed_rounds, fed_updates, the registry) and each `tick`
reads it afresh, so a coordinator killed at any moment and started again goes on where the
store says the round was; a step interrupted half way is done again from the start, and
every step is idempotent (the task is retained, aggregation is a pure function of the stored
updates, the candidate bundle is written atomically and reused, the rollout is adopted).

Phases of a running round: `announce` (the FedTask goes out retained on fed/{round}/task) ->
`collect` (updates arrive through the ingestor into the store; each is judged here) -> at
the deadline, or once every expected device reported, the task is cleared and the round
closes -> `aggregate` (norm bound, quorum, aggregation, evaluation, the candidate bundle) ->
`publish` (the signed bundle into the archive store and a rollout to the group) -> done.
A round ends `done` (published), `aggregated` (accepted, but this coordinator has no signing
key: the candidate waits to be signed and deployed by hand), `failed` (with the reason) or
`aborted` (by the operator).
"""

from __future__ import annotations

import json
import logging
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import BundleError
from edgefleet.agent.protocol import FedTask, FedUpdate, sampled
from edgefleet.server.federated.aggregate import AGGREGATORS, AggregatorError, aggregate
from edgefleet.server.federated.base import BaseBundle, open_base
from edgefleet.server.federated.candidate import (
    candidate_body,
    candidate_files,
    new_heads,
    write_signed,
    write_unsigned,
)
from edgefleet.server.federated.evaluate import (
    DeviceFigures,
    ExitValues,
    Holdout,
    HoldoutFigures,
    compare_heads,
    device_figures,
    exit_values,
    preprocess,
    verdict,
)
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.federated.updates import F32, Judged, decode, judge, parse
from edgefleet.server.federated.validate import robust_norm_bound, update_norm
from edgefleet.server.fleet.store.base import (
    FedRoundRecord,
    FedUpdateRecord,
    Store,
)
from edgefleet.server.fleet.store.errors import RolloutConflict
from edgefleet.server.rollout.archives import ArchiveInfo, ArchiveStore
from edgefleet.server.rollout.engine import RolloutEngine, RolloutError

log = logging.getLogger(__name__)


class RoundError(ValueError):
    """A round cannot be created or changed as asked (the API answers 409)."""


class RoundNotFound(RoundError):
    """No such round, or a group without devices (404)."""


class RoundSpecError(RoundError):
    """The spec does not fit the base bundle or the group (400)."""


class TaskPublisher(Protocol):
    """Puts a round's task on the broker retained, or clears it."""

    def publish_task(self, task: FedTask) -> None: ...

    def clear_task(self, round_id: str) -> None: ...

    def generation(self) -> int: ...


def new_round_id(now: float) -> str:
    """f-YYYYmmdd-HHMMSS-xxxx: sortable, readable, a valid topic level."""
    return time.strftime("f-%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class Aggregated:
    """What aggregation made of a round's accepted updates."""

    delta: dict[str, F32]
    updates: list[FedUpdate]
    figures: dict[str, Any]


@dataclass(frozen=True)
class Built:
    """An accepted candidate on disk, its figures and the evaluation's words."""

    path: Path
    figures: dict[str, Any]
    why: str


@dataclass(frozen=True)
class Failed:
    """Why a round cannot produce a result, with the figures gathered so far."""

    reason: str
    figures: dict[str, Any] | None = None


class RoundEngine:
    """Drives every running round of the store one step per tick."""

    def __init__(
        self,
        store: Store,
        archives: ArchiveStore,
        rollouts: RolloutEngine,
        publisher: TaskPublisher,
        *,
        work_dir: Path,
        signing_key: Ed25519PrivateKey | None = None,
        holdout: Holdout | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.archives = archives
        self.rollouts = rollouts
        self.publisher = publisher
        self.work_dir = Path(work_dir)
        self.signing_key = signing_key
        self.holdout = holdout
        self.clock = clock
        self._lock = threading.Lock()
        self._bases: dict[str, BaseBundle] = {}
        self._holdout_values: dict[str, tuple[ExitValues, Any]] = {}
        # round id -> publisher generation at which its task was last published.
        self._announced: dict[str, int] = {}

    # -- creating -----------------------------------------------------------------------------

    def create(self, spec: RoundSpec) -> str:
        """Check the group, its base and the spec, and store a round to announce; its id."""
        group = spec.group
        members = self.store.devices(group)
        if not members:
            raise RoundNotFound(f"group {group!r} has no devices")
        online = [d for d in members if d.online and d.status and d.status.bundle_sha256]
        if not online:
            raise RoundError(f"no online device of group {group!r} reports the bundle it runs")
        bases = Counter(str(d.status.bundle_sha256) for d in online if d.status)
        if len(bases) > 1:
            told = ", ".join(f"{sha[:12]} ({n} devices)" for sha, n in bases.most_common())
            raise RoundError(
                f"the online devices of group {group!r} run {len(bases)} bundles: {told}; "
                "a round needs one base (let the rollout finish first)"
            )
        (manifest,) = bases
        info = self.archives.by_manifest(manifest)
        if info is None:
            raise RoundError(
                f"group {group!r} runs bundle {manifest[:12]}, which this coordinator does not "
                "hold: upload it first (POST /bundles, as `edgefleet deploy` does)"
            )
        try:
            base = self._base(info)
        except BundleError as exc:
            raise RoundError(f"the base bundle does not verify: {exc}") from None
        heads = list(spec.heads) if spec.heads is not None else base.trainable
        if not heads:
            raise RoundSpecError(
                f"{info.model_id} v{info.version} has no early exit with a head file to train"
            )
        for k in heads:
            try:
                base.head_file(k)
            except ValueError as exc:
                raise RoundSpecError(str(exc)) from None
        now = self.clock()
        round_id = new_round_id(now)
        expected = tuple(
            sorted(
                d.device_id
                for d in online
                if d.status
                and d.status.bundle_sha256 == manifest
                and sampled(round_id, d.device_id, spec.sampling)
            )
        )
        if not expected:
            raise RoundError(
                f"sampling {spec.sampling:g} selected none of the {len(online)} online devices "
                f"of group {group!r}; sample a larger share"
            )
        self._check_numbers(spec, len(expected))
        task = spec.task(
            round_id,
            model_id=info.model_id,
            base_manifest_sha256=manifest,
            base_version=info.version,
            heads=heads,
            now=now,
        )
        self.store.create_fed_round(
            FedRoundRecord(
                round_id=round_id,
                group=group,
                state="running",
                phase="announce",
                phase_started_at=now,
                spec_json=spec.model_dump_json(),
                task_json=task.model_dump_json(),
                model_id=info.model_id,
                base_manifest_sha256=manifest,
                base_bundle_sha256=info.sha256,
                base_version=info.version,
                expected=expected,
                received=0,
                rejected=0,
                deadline_at=task.deadline_ts,
                figures_json=None,
                result_version=None,
                result_path=None,
                result_bundle_sha256=None,
                result_manifest_sha256=None,
                rollout_id=None,
                reason=None,
                created_at=now,
                updated_at=now,
                closed_at=None,
            )
        )
        log.info(
            "round %s: %s v%d, heads %s, group %s: %d device(s) expected, deadline in %.0f s",
            round_id,
            info.model_id,
            info.version,
            task.heads,
            group,
            len(expected),
            spec.deadline_s,
        )
        return round_id

    @staticmethod
    def _check_numbers(spec: RoundSpec, expected: int) -> None:
        needed = spec.needed(expected)
        if needed > expected:
            raise RoundSpecError(
                f"quorum {spec.quorum} needs {needed} updates but only {expected} device(s) "
                "are expected"
            )
        if spec.aggregator == "krum":
            f = spec.aggregator_kwargs()["f"]
            if expected < 2 * f + 3:
                raise RoundSpecError(
                    f"krum with f={f} needs at least {2 * f + 3} updates; "
                    f"{expected} device(s) expected"
                )

    # -- operator actions ---------------------------------------------------------------------

    def abort(self, round_id: str) -> None:
        """Stop collecting and close the round without a result; the task is cleared."""
        r = self.store.fed_round(round_id)
        if r is None:
            raise RoundNotFound(f"no round {round_id!r}")
        if r.state != "running":
            raise RoundError(f"cannot abort round {round_id}: it is {r.state}")
        if r.phase == "publish":
            raise RoundError(
                f"cannot abort round {round_id}: its bundle is being rolled out; "
                "abort the rollout instead"
            )
        self.publisher.clear_task(round_id)
        now = self.clock()
        done = self.store.update_fed_round(
            round_id,
            only_if="running",
            state="aborted",
            phase="done",
            phase_started_at=now,
            reason="aborted by the operator",
            closed_at=r.closed_at or now,
        )
        if done is None:
            raise RoundError(f"cannot abort round {round_id}: it finished meanwhile")
        log.warning("round %s aborted by the operator", round_id)

    # -- the loop -----------------------------------------------------------------------------

    def tick(self) -> None:
        """One step of every running round."""
        for r in self.store.fed_rounds(states=["running"]):
            try:
                self._step(r)
            except Exception:  # one broken round must not stop the others
                log.exception("round %s: step failed; retrying at the next tick", r.round_id)

    def _step(self, r: FedRoundRecord) -> None:
        spec = RoundSpec.model_validate_json(r.spec_json)
        now = self.clock()
        try:
            self._advance(r, spec, now)
        except BundleError as exc:  # the base archive went missing or no longer verifies
            self._fail(r, f"base bundle unusable: {exc}", now)

    def _advance(self, r: FedRoundRecord, spec: RoundSpec, now: float) -> None:
        if r.phase == "announce":
            self._announce(r)
            self.store.update_fed_round(
                r.round_id,
                only_if="running",
                only_phase="announce",
                phase="collect",
                phase_started_at=now,
            )
        elif r.phase == "collect":
            self._announce(r)
            self._judge_pending(r, spec)
            if now >= r.deadline_at:
                self._close(r, now, "deadline reached")
            elif set(r.expected) <= self._reported(r.round_id):
                self._close(r, now, f"all {len(r.expected)} expected device(s) reported")
        elif r.phase == "aggregate":
            self._aggregate(r, spec, now)
        elif r.phase == "publish":
            self._publish(r, spec, now)

    def _announce(self, r: FedRoundRecord) -> None:
        """The retained task, once per broker session (a restarted broker may have lost it)."""
        generation = self.publisher.generation()
        if self._announced.get(r.round_id) == generation:
            return
        self.publisher.publish_task(FedTask.model_validate_json(r.task_json))
        self._announced[r.round_id] = generation
        log.info("round %s: task published on fed/%s/task", r.round_id, r.round_id)

    def _close(self, r: FedRoundRecord, now: float, why: str) -> None:
        # Off the broker first: a crash in between closes again and clears again.
        self.publisher.clear_task(r.round_id)
        self._announced.pop(r.round_id, None)
        closed = self.store.update_fed_round(
            r.round_id,
            only_if="running",
            only_phase="collect",
            phase="aggregate",
            phase_started_at=now,
            closed_at=now,
        )
        if closed is not None:  # else another coordinator closed it first
            log.info("round %s closed: %s", r.round_id, why)

    def _reported(self, round_id: str) -> set[str]:
        return {u.device_id for u in self.store.fed_updates(round_id, ["accepted", "rejected"])}

    # -- judging updates ----------------------------------------------------------------------

    def _judge_pending(self, r: FedRoundRecord, spec: RoundSpec) -> None:
        pending = self.store.fed_updates(r.round_id, ["received"], with_payload=True)
        if not pending:
            return
        task = FedTask.model_validate_json(r.task_json)
        shapes = self._base_of(r).shapes(task.heads)
        members = {d.device_id for d in self.store.devices(r.group)}
        for rec in pending:
            verdict_ = self._judge_one(r, spec, rec, shapes, members)
            self.store.judge_fed_update(
                r.round_id,
                rec.device_id,
                rec.base_manifest_sha256,
                status=verdict_.status,
                reason=verdict_.reason,
                norm=verdict_.norm,
            )
            if verdict_.status == "rejected":
                log.warning("round %s: update of %s rejected: %s", r.round_id, rec.device_id,
                            verdict_.reason)

    @staticmethod
    def _judge_one(
        r: FedRoundRecord,
        spec: RoundSpec,
        rec: FedUpdateRecord,
        shapes: dict[str, tuple[int, ...]],
        members: set[str],
    ) -> Judged:
        update = parse(rec.payload)
        if isinstance(update, str):
            return Judged("rejected", update)
        if rec.device_id not in members:
            return Judged("rejected", f"not a device of group {r.group!r}")
        if not sampled(r.round_id, rec.device_id, spec.sampling):
            return Judged("rejected", "not sampled for this round")
        return judge(update, model_id=r.model_id, shapes=shapes, max_norm=spec.max_norm)

    # -- aggregating and evaluating -----------------------------------------------------------

    def _aggregate(self, r: FedRoundRecord, spec: RoundSpec, now: float) -> None:
        self._judge_pending(r, spec)  # what was stored just before the round closed
        built = self._build(r, spec, now)
        if isinstance(built, Failed):
            self._fail(r, built.reason, now, built.figures)
            return
        figures_json = json.dumps(built.figures, sort_keys=True)
        version = r.base_version + 1
        if self.signing_key is None:
            self.store.update_fed_round(
                r.round_id,
                only_if="running",
                only_phase="aggregate",
                state="aggregated",
                phase="done",
                phase_started_at=now,
                figures_json=figures_json,
                result_version=version,
                result_path=str(built.path),
                reason=f"accepted ({built.why}); this coordinator has no signing key: sign the "
                f"candidate where the fleet key is (edgefleet fl sign {built.path} --out DIR) "
                f"and roll it out with `edgefleet deploy DIR --group {r.group}`",
            )
            log.warning("round %s aggregated; candidate v%d at %s waits to be signed",
                        r.round_id, version, built.path)
            return
        self.store.update_fed_round(
            r.round_id,
            only_if="running",
            only_phase="aggregate",
            phase="publish",
            phase_started_at=now,
            figures_json=figures_json,
            result_version=version,
            result_path=str(built.path),
            reason=f"accepted: {built.why}",
        )

    def _build(self, r: FedRoundRecord, spec: RoundSpec, now: float) -> Built | Failed:
        """Aggregate, evaluate and write the candidate (or reuse the one written before).

        A pure function of the store: the same accepted updates, the norm bound fixed once
        (stored with the round before anything is rejected by it), the close time as the
        bundle's creation time and Ed25519's deterministic signatures give the same bytes on
        any coordinator and after any restart.
        """
        base = self._base_of(r)
        done = self._combine(r, spec)
        if isinstance(done, Failed):
            return done
        heads = new_heads(base, done.delta)
        figures = done.figures
        held = self._holdout_figures(r, base, heads)
        devices = device_figures(done.updates)
        ok, why = verdict(held, devices, spec.max_accuracy_drop)
        figures.update(
            holdout=held.as_dict() if held else None,
            devices_val=devices.as_dict() if devices else None,
            accepted=ok,
            verdict=why,
        )
        if not ok:
            return Failed(f"evaluation: {why}: worse than the tolerance allows", figures)
        out = self._candidate_dir(r)
        if not out.exists():  # written atomically: an existing one is complete
            body = candidate_body(
                base,
                created_ts=r.closed_at or now,
                provenance={
                    "fed_round": r.round_id,
                    "fed_base_version": r.base_version,
                    "fed_aggregator": spec.aggregator,
                    "fed_updates": len(done.updates),
                },
                extra_metrics=_extra_metrics(held, devices),
            )
            files = candidate_files(base, heads)
            if self.signing_key is not None:
                write_signed(out, body, files, self.signing_key)
            else:
                write_unsigned(out, body, files)
        return Built(out, figures, why)

    def _candidate_dir(self, r: FedRoundRecord) -> Path:
        kind = "bundle" if self.signing_key is not None else "candidate"
        return self.work_dir / r.round_id / f"{kind}-v{r.base_version + 1}"

    def _combine(self, r: FedRoundRecord, spec: RoundSpec) -> Aggregated | Failed:
        """Aggregate the accepted updates, or say why the round fails."""
        accepted = self.store.fed_updates(r.round_id, ["accepted"], with_payload=True)
        kept: list[tuple[FedUpdateRecord, FedUpdate, dict[str, F32]]] = []
        for rec in accepted:
            update = parse(rec.payload)
            delta = decode(update) if not isinstance(update, str) else update
            if isinstance(update, str) or isinstance(delta, str):
                self._reject(r, rec, str(delta))
                continue
            kept.append((rec, update, delta))
        bound = self._norm_bound(r, spec, [update_norm(d) for _, _, d in kept])
        if bound is not None and spec.max_norm is None:
            for item in list(kept):
                norm = update_norm(item[2])
                if norm > bound:
                    self._reject(
                        r, item[0], f"norm {norm:.6g} above the round's bound {bound:.6g} "
                        "(5x the median norm of its updates)"
                    )
                    kept.remove(item)
        needed = spec.needed(len(r.expected))
        if len(kept) < needed:
            rejected = len(self.store.fed_updates(r.round_id, ["rejected"]))
            silent = len(set(r.expected) - self._reported(r.round_id))
            return Failed(
                f"below quorum: {len(kept)} accepted update(s), {needed} needed "
                f"({len(r.expected)} expected, {silent} did not report, {rejected} rejected)"
            )
        deltas = [d for _, _, d in kept]
        weights = [float(u.samples) for _, u, _ in kept]
        params = spec.aggregator_kwargs()
        if spec.aggregator == "norm_clipped_fedavg" and "bound" not in params:
            params["bound"] = max(statistics.median(update_norm(d) for d in deltas), 1e-12)
        try:
            delta = aggregate(spec.aggregator, deltas, weights, **params)
        except AggregatorError as exc:
            return Failed(f"aggregation failed: {exc}")
        total = sum(weights)
        figures: dict[str, Any] = {
            "aggregator": spec.aggregator,
            "params": params,
            "updates": len(kept),
            "expected": len(r.expected),
            "devices": [rec.device_id for rec, _, _ in kept],
            "samples": {rec.device_id: u.samples for rec, u, _ in kept},
            # What FedAvg weighed each device by: its samples over those of the reporters.
            "weights": {rec.device_id: u.samples / total for rec, u, _ in kept}
            if AGGREGATORS[spec.aggregator].uses_weights
            else None,
            "norm_bound": bound,
            "delta_norm": update_norm(delta),
        }
        return Aggregated(delta, [u for _, u, _ in kept], figures)

    def _norm_bound(
        self, r: FedRoundRecord, spec: RoundSpec, norms: list[float]
    ) -> float | None:
        """The fixed bound, else 5x the median norm, stored before anything is cut by it.

        Worked out again after a restart it would come from the survivors of the first cut
        and could cut again; stored, the round judges every update by the same bound.
        """
        if spec.max_norm is not None:
            return spec.max_norm
        fresh = self.store.fed_round(r.round_id)
        stored = json.loads(fresh.figures_json or "{}") if fresh is not None else {}
        if stored.get("norm_bound") is not None:
            return float(stored["norm_bound"])
        if not norms:
            return None
        bound = robust_norm_bound(norms)
        self.store.update_fed_round(
            r.round_id,
            only_phase="aggregate",
            figures_json=json.dumps({"norm_bound": bound}),
        )
        return bound

    def _holdout_figures(
        self, r: FedRoundRecord, base: BaseBundle, heads: dict[int, Any]
    ) -> HoldoutFigures | None:
        if self.holdout is None:
            return None
        key = r.base_manifest_sha256
        if key not in self._holdout_values:
            labels = self.holdout.label_indices(base.manifest.labels)
            values = exit_values(base.verified, preprocess(base.verified, self.holdout))
            self._holdout_values[key] = (values, labels)
        values, labels = self._holdout_values[key]
        point, thresholds = self._operating_point(r, base)
        return compare_heads(values, labels, heads, thresholds, point)

    def _operating_point(
        self, r: FedRoundRecord, base: BaseBundle
    ) -> tuple[int | None, list[float | None]]:
        """The operating point most expected devices run (their status), else the default."""
        m = base.manifest
        if not m.operating_points:
            return None, [None] * len(m.early_exits)
        running = Counter(
            d.status.operating_point
            for d in self.store.devices(r.group)
            if d.device_id in r.expected
            and d.status is not None
            and d.status.operating_point is not None
            and 0 <= d.status.operating_point < len(m.operating_points)
        )
        point = running.most_common(1)[0][0] if running else m.default_operating_point
        return point, list(m.operating_points[point].thresholds)

    # -- publishing ---------------------------------------------------------------------------

    def _publish(self, r: FedRoundRecord, spec: RoundSpec, now: float) -> None:
        # The candidate this coordinator wrote, or the same bytes built again (another
        # coordinator aggregated, or the files were lost): _build is deterministic.
        out = self._candidate_dir(r)
        if not out.exists():
            built = self._build(r, spec, now)
            if isinstance(built, Failed):
                self._fail(r, f"the candidate could not be built again: {built.reason}", now)
                return
        try:
            info = self.archives.add(out)
        except BundleError as exc:
            self._fail(
                r, f"the signed candidate does not verify with the coordinator's fleet keys "
                f"(is the signing key's public half a --fleet-key?): {exc}", now
            )
            return
        rollout_id = self._adopt(r, info)
        if rollout_id is None:
            try:
                rollout_id = self.rollouts.create(r.group, info.sha256, spec.rollout)
            except RolloutConflict as exc:
                self._fail(r, f"cannot roll v{info.version} out: {exc}", now)
                return
            except RolloutError as exc:
                self._fail(r, f"cannot roll v{info.version} out: {exc}", now)
                return
        self.store.update_fed_round(
            r.round_id,
            only_if="running",
            only_phase="publish",
            state="done",
            phase="done",
            phase_started_at=now,
            result_bundle_sha256=info.sha256,
            result_manifest_sha256=info.manifest_sha256,
            rollout_id=rollout_id,
            reason=f"{r.reason or 'accepted'}; published {info.model_id} v{info.version} "
            f"as rollout {rollout_id}",
        )
        log.info("round %s done: %s v%d goes out as rollout %s", r.round_id, info.model_id,
                 info.version, rollout_id)

    def _adopt(self, r: FedRoundRecord, info: ArchiveInfo) -> str | None:
        """A rollout of this very bundle made since the round closed (a step cut short)."""
        since = r.closed_at or r.created_at
        for other in self.store.rollouts(group=r.group, limit=20):
            if other.bundle_sha256 == info.sha256 and other.created_at >= since:
                return other.rollout_id
        return None

    # -- ending -------------------------------------------------------------------------------

    def _fail(
        self, r: FedRoundRecord, reason: str, now: float, figures: dict[str, Any] | None = None
    ) -> None:
        self.publisher.clear_task(r.round_id)
        self._announced.pop(r.round_id, None)
        self.store.update_fed_round(
            r.round_id,
            only_if="running",
            state="failed",
            phase="done",
            phase_started_at=now,
            reason=reason[:1000],
            figures_json=json.dumps(figures, sort_keys=True) if figures else None,
            closed_at=r.closed_at or now,
        )
        log.warning("round %s failed: %s", r.round_id, reason)

    def _reject(self, r: FedRoundRecord, rec: FedUpdateRecord, reason: str) -> None:
        self.store.judge_fed_update(
            r.round_id,
            rec.device_id,
            rec.base_manifest_sha256,
            status="rejected",
            reason=reason,
            norm=rec.norm,
        )
        log.warning("round %s: update of %s rejected: %s", r.round_id, rec.device_id, reason)

    # -- the base bundle ----------------------------------------------------------------------

    def _base_of(self, r: FedRoundRecord) -> BaseBundle:
        info = self.archives.get(r.base_bundle_sha256)
        if info is None:
            raise BundleError(
                self.archives.directory / r.base_bundle_sha256, "the round's base archive is gone"
            )
        return self._base(info)

    def _base(self, info: ArchiveInfo) -> BaseBundle:
        with self._lock:
            base = self._bases.get(info.manifest_sha256)
            if base is None:
                base = open_base(info, self.work_dir / "bases", self.archives.trusted_keys)
                self._bases[info.manifest_sha256] = base
            return base


def _extra_metrics(
    held: HoldoutFigures | None, devices: DeviceFigures | None
) -> dict[str, float]:
    out: dict[str, float] = {}
    if held is not None:
        out["fed_holdout_accuracy"] = held.accuracy_after
        out["fed_holdout_exit_rate"] = held.exit_rate_after
    if devices is not None:
        out["fed_devices_val_accuracy"] = devices.accuracy_after
    return out

