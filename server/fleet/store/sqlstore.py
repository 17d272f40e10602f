"""Every Store method, written once over a backend's transactions (sql.Sql).

A backend subclasses SqlStore and supplies _run (a transaction around a body, with its
connection handling and retries) and close(); the SQL here runs on every backend.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar, get_args

from edgefleet.agent.protocol import Event, Reply, Telemetry
from edgefleet.server.fleet.store import catalogue, fed, ingest, logic, losses, rollouts, rows
from edgefleet.server.fleet.store.base import (
    BundleRecord,
    CommandRecord,
    DeviceRecord,
    EventRecord,
    FedRoundRecord,
    FedRoundState,
    FedUpdateRecord,
    FedUpdateStatus,
    IngestBatch,
    IngestOutcome,
    RejectReason,
    RetentionOutcome,
    RetentionPolicy,
    RolloutDeviceRecord,
    RolloutDeviceState,
    RolloutRecord,
    RolloutState,
    RollupRecord,
    SequenceReport,
    Store,
    TelemetryRecord,
)
from edgefleet.server.fleet.store.catalogue_base import (
    BuildJobRecord,
    DecisionAction,
    DecisionRecord,
    GroupTarget,
    JobState,
    LatencyRecord,
    ModelRecord,
    VariantRecord,
)
from edgefleet.server.fleet.store.schema import pending
from edgefleet.server.fleet.store.sql import Lock, Row, Sql

_T = TypeVar("_T")

DAY_S = 86_400.0


class SqlStore(Store):
    """The store's behaviour on any SQL backend; subclasses bring the connection."""

    @abstractmethod
    def _run(self, body: Callable[[Sql], _T], *, write: bool) -> _T:
        """Run body in one transaction (taking the write lock up front when write)."""

    # -- schema ---------------------------------------------------------------------------

    def migrate(self) -> int:
        def step(sql: Sql) -> int | None:
            sql.lock(Lock.MIGRATE)
            sql.run(sql.VERSION_TABLE)
            current = _version(sql)
            todo = pending(current)
            if not todo:
                return current
            m = todo[0]
            sql.run_script(m)
            sql.run(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (m.version, m.description, time.time()),
            )
            return None

        # One transaction per version, so a crash leaves the database at a whole version.
        while True:
            done = self._run(step, write=True)
            if done is not None:
                return done

    def schema_version(self) -> int:
        return self._run(
            lambda sql: _version(sql) if sql.table_exists("schema_version") else 0, write=False
        )

    # -- writing --------------------------------------------------------------------------

    def ingest(self, batch: IngestBatch, *, registration_open: bool = True) -> IngestOutcome:
        return self._run(
            lambda sql: ingest.write(
                sql, batch, registration_open=registration_open, tolerance_s=self.CLOCK_TOLERANCE_S
            ),
            write=True,
        )

    def register(self, device_id: str, group: str | None = None) -> None:
        self._run(
            lambda sql: sql.run(
                "INSERT INTO devices (device_id, device_group, registered_at) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET "
                "device_group = coalesce(excluded.device_group, devices.device_group)",
                (device_id, group, time.time()),
            ),
            write=True,
        )

    def set_group(self, device_id: str, group: str | None) -> None:
        changed = self._run(
            lambda sql: sql.run(
                "UPDATE devices SET device_group = ? WHERE device_id = ?", (group, device_id)
            ),
            write=True,
        )
        if changed == 0:
            raise KeyError(device_id)

    def log_command(self, record: CommandRecord) -> None:
        self._run(
            lambda sql: sql.run(
                "INSERT INTO commands (command_id, target, name, body_json, sent_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING",
                (record.command_id, record.target, record.name, record.body_json, record.sent_at),
            ),
            write=True,
        )

    def declare_losses(self, now: float, grace_s: float) -> int:
        return self._run(lambda sql: losses.declare(sql, now, grace_s), write=True)

    def apply_retention(self, now: float, policy: RetentionPolicy) -> RetentionOutcome:
        raw_cutoff = now - policy.raw_days * DAY_S
        keep = now - policy.rollup_days * DAY_S

        def write(sql: Sql) -> RetentionOutcome:
            sql.lock(Lock.RETENTION)
            deleted, rolled = sql.roll_up(raw_cutoff, policy.bucket_s, keep)
            return RetentionOutcome(
                windows_rolled_up=rolled,
                windows_deleted=deleted,
                rollups_deleted=sql.run("DELETE FROM rollups WHERE bucket_start < ?", (keep,)),
                events_deleted=sql.run(
                    "DELETE FROM events WHERE received_at < ?",
                    (now - policy.events_days * DAY_S,),
                ),
            )

        return self._run(write, write=True)

    # -- reading --------------------------------------------------------------------------
    # A parameter that may be NULL gets a query of its own: PostgreSQL cannot type "? IS NULL".

    def devices(self, group: str | None = None) -> list[DeviceRecord]:
        select = f"SELECT {rows.DEVICE_COLUMNS} FROM devices"
        if group is None:
            found = self._read(f"{select} ORDER BY device_id")
        else:
            found = self._read(f"{select} WHERE device_group = ? ORDER BY device_id", (group,))
        return [rows.device_record(r) for r in found]

    def device(self, device_id: str) -> DeviceRecord | None:
        found = self._read(
            f"SELECT {rows.DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)
        )
        return rows.device_record(found[0]) if found else None

    def groups(self) -> dict[str, int]:
        found = self._read(
            "SELECT device_group, count(*) FROM devices WHERE device_group IS NOT NULL "
            "GROUP BY device_group ORDER BY device_group"
        )
        return {str(g): int(n) for g, n in found}

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRecord]:
        found = self._read(
            "SELECT device_id, seq, received_at, payload FROM telemetry "
            "WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
            (device_id, limit),
        )
        return [
            TelemetryRecord(str(d), int(s), float(t), m)
            for d, s, t, p in found
            if (m := rows.stored(Telemetry, p, f"{d} seq {s}")) is not None
        ]

    def rollups(self, device_id: str, since: float = 0.0) -> list[RollupRecord]:
        found = self._read(
            f"SELECT {rows.ROLLUP_COLUMNS} FROM rollups "
            "WHERE device_id = ? AND bucket_start >= ? ORDER BY bucket_start",
            (device_id, since),
        )
        return [rows.rollup_from_row(r) for r in found]

    def events(self, device_id: str | None = None, limit: int = 100) -> list[EventRecord]:
        select = "SELECT device_id, seq, received_at, payload FROM events"
        if device_id is None:
            found = self._read(
                f"{select} ORDER BY received_at DESC, device_id, seq DESC LIMIT ?", (limit,)
            )
        else:
            found = self._read(
                f"{select} WHERE device_id = ? ORDER BY seq DESC LIMIT ?", (device_id, limit)
            )
        return [
            EventRecord(str(d), int(s), float(t), m)
            for d, s, t, p in found
            if (m := rows.stored(Event, p, f"{d} event {s}")) is not None
        ]

    def commands(self, limit: int = 100) -> list[CommandRecord]:
        def read(sql: Sql) -> tuple[list[Row], dict[str, list[Reply]]]:
            listed = sql.rows(
                "SELECT command_id, target, name, body_json, sent_at FROM commands "
                "ORDER BY sent_at DESC, command_id LIMIT ?",
                (limit,),
            )
            replies: dict[str, list[Reply]] = {}
            for command_id, payload in sql.rows(
                f"SELECT command_id, payload FROM replies WHERE command_id {sql.IN_LIST} "
                "ORDER BY command_id, device_id",
                (sql.as_list([c[0] for c in listed]),),
            ):
                reply = rows.stored(Reply, payload, f"command {command_id}")
                if reply is not None:
                    replies.setdefault(str(command_id), []).append(reply)
            return listed, replies

        found, replies = self._run(read, write=False)
        return [rows.command_record(r, replies.get(str(r[0]), [])) for r in found]

    def sequence_reports(self, device_id: str | None = None) -> list[SequenceReport]:
        select = f"SELECT {rows.SEQUENCE_COLUMNS} FROM devices WHERE max_seq IS NOT NULL"
        if device_id is None:
            found = self._read(f"{select} ORDER BY device_id")
        else:
            found = self._read(f"{select} AND device_id = ? ORDER BY device_id", (device_id,))
        return [rows.sequence_report(r) for r in found]

    def reject_counts(self) -> dict[str, int]:
        stored = {str(r): int(n) for r, n in self._read("SELECT reason, n FROM reject_counts")}
        return logic.merged_counts(stored, get_args(RejectReason))

    def telemetry_count(self) -> int:
        (n,) = self._run(lambda sql: sql.one("SELECT count(*) FROM telemetry"), write=False)
        return int(n)

    # -- rollouts (the SQL is in rollouts.py) -----------------------------------------------

    def add_bundle(self, record: BundleRecord) -> bool:
        return self._run(lambda sql: rollouts.add_bundle(sql, record), write=True)

    def bundle(self, sha256: str) -> BundleRecord | None:
        found = self._read(
            f"SELECT {rollouts.BUNDLE_COLUMNS} FROM bundles WHERE sha256 = ?", (sha256,)
        )
        return rollouts.bundle_record(found[0]) if found else None

    def bundles(self) -> list[BundleRecord]:
        found = self._read(
            f"SELECT {rollouts.BUNDLE_COLUMNS} FROM bundles ORDER BY added_at DESC, sha256"
        )
        return [rollouts.bundle_record(r) for r in found]

    def mark_bundle_published(self, sha256: str, at: float, published_bytes: int) -> None:
        changed = self._run(
            lambda sql: sql.run(
                "UPDATE bundles SET published_at = ?, published_bytes = ?, cleared_at = NULL "
                "WHERE sha256 = ?",
                (at, published_bytes, sha256),
            ),
            write=True,
        )
        if changed == 0:
            raise KeyError(sha256)

    def mark_bundle_cleared(self, sha256: str, at: float) -> None:
        changed = self._run(
            lambda sql: sql.run("UPDATE bundles SET cleared_at = ? WHERE sha256 = ?", (at, sha256)),
            write=True,
        )
        if changed == 0:
            raise KeyError(sha256)

    def create_rollout(self, record: RolloutRecord, waves: list[list[str]]) -> None:
        self._run(lambda sql: rollouts.create_rollout(sql, record, waves), write=True)

    def rollout(self, rollout_id: str) -> RolloutRecord | None:
        found = self._read(
            f"SELECT {rollouts.ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?", (rollout_id,)
        )
        return rollouts.rollout_record(found[0]) if found else None

    def rollouts(
        self,
        group: str | None = None,
        states: Sequence[RolloutState] | None = None,
        limit: int = 100,
    ) -> list[RolloutRecord]:
        found = self._run(
            lambda sql: rollouts.rollouts_query(sql, group, states, limit), write=False
        )
        return [rollouts.rollout_record(r) for r in found]

    def rollout_devices(self, rollout_id: str) -> list[RolloutDeviceRecord]:
        found = self._read(
            f"SELECT {rollouts.DEVICE_COLUMNS} FROM rollout_devices WHERE rollout_id = ? "
            "ORDER BY wave, device_id",
            (rollout_id,),
        )
        return [rollouts.device_record(r) for r in found]

    def update_rollout(
        self,
        rollout_id: str,
        *,
        state: RolloutState | None = None,
        phase: str | None = None,
        phase_started_at: float | None = None,
        reason: str | None = None,
    ) -> RolloutRecord:
        if state is not None:
            rollouts.check_state(state)
        changes = {
            "state": state,
            "phase": phase,
            "phase_started_at": phase_started_at,
            "reason": reason,
        }
        row = self._run(
            lambda sql: rollouts.update(
                sql, "rollouts", {"rollout_id": rollout_id}, changes, rollouts.ROLLOUT_COLUMNS
            ),
            write=True,
        )
        if row is None:
            raise KeyError(rollout_id)
        return rollouts.rollout_record(row)

    def update_rollout_device(
        self,
        rollout_id: str,
        device_id: str,
        *,
        state: RolloutDeviceState | None = None,
        have: int | None = None,
        total: int | None = None,
        reason: str | None = None,
        sent_at: float | None = None,
        deadline_at: float | None = None,
        previous_manifest_sha256: str | None = None,
    ) -> RolloutDeviceRecord:
        if state is not None:
            rollouts.check_device_state(state)
        changes = {
            "state": state,
            "have": have,
            "total": total,
            "reason": reason,
            "sent_at": sent_at,
            "deadline_at": deadline_at,
            "previous_manifest_sha256": previous_manifest_sha256,
        }
        key = {"rollout_id": rollout_id, "device_id": device_id}
        row = self._run(
            lambda sql: rollouts.update(
                sql, "rollout_devices", key, changes, rollouts.DEVICE_COLUMNS
            ),
            write=True,
        )
        if row is None:
            raise KeyError(f"{device_id} in rollout {rollout_id}")
        return rollouts.device_record(row)

    # -- federated rounds (the SQL is in fed.py) --------------------------------------------

    def create_fed_round(self, record: FedRoundRecord) -> None:
        self._run(lambda sql: fed.create_round(sql, record), write=True)

    def fed_round(self, round_id: str) -> FedRoundRecord | None:
        found = self._read(
            f"SELECT {fed.ROUND_COLUMNS} FROM fed_rounds WHERE round_id = ?", (round_id,)
        )
        return fed.round_record(found[0]) if found else None

    def fed_rounds(
        self,
        group: str | None = None,
        states: Sequence[FedRoundState] | None = None,
        limit: int = 100,
    ) -> list[FedRoundRecord]:
        found = self._run(lambda sql: fed.rounds_query(sql, group, states, limit), write=False)
        return [fed.round_record(r) for r in found]

    def update_fed_round(
        self,
        round_id: str,
        *,
        only_if: FedRoundState | None = None,
        only_phase: str | None = None,
        state: FedRoundState | None = None,
        phase: str | None = None,
        phase_started_at: float | None = None,
        reason: str | None = None,
        figures_json: str | None = None,
        result_version: int | None = None,
        result_path: str | None = None,
        result_bundle_sha256: str | None = None,
        result_manifest_sha256: str | None = None,
        rollout_id: str | None = None,
        closed_at: float | None = None,
    ) -> FedRoundRecord | None:
        for checked in (state, only_if):
            if checked is not None:
                fed.check_state(checked)
        changes = {
            "state": state,
            "phase": phase,
            "phase_started_at": phase_started_at,
            "reason": reason,
            "figures_json": figures_json,
            "result_version": result_version,
            "result_path": result_path,
            "result_bundle_sha256": result_bundle_sha256,
            "result_manifest_sha256": result_manifest_sha256,
            "rollout_id": rollout_id,
            "closed_at": closed_at,
        }
        row = self._run(
            lambda sql: fed.update_round(sql, round_id, only_if, only_phase, changes), write=True
        )
        return None if row is None else fed.round_record(row)

    def fed_updates(
        self,
        round_id: str,
        statuses: Sequence[FedUpdateStatus] | None = None,
        *,
        with_payload: bool = False,
    ) -> list[FedUpdateRecord]:
        found = self._run(
            lambda sql: fed.updates_query(sql, round_id, statuses, with_payload), write=False
        )
        return [fed.update_record(r) for r in found]

    def judge_fed_update(
        self,
        round_id: str,
        device_id: str,
        base_manifest_sha256: str,
        *,
        status: FedUpdateStatus,
        reason: str | None = None,
        norm: float | None = None,
    ) -> FedUpdateRecord:
        fed.check_status(status)
        key = (round_id, device_id, base_manifest_sha256)
        row = self._run(lambda sql: fed.judge(sql, key, status, reason, norm), write=True)
        if row is None:
            raise KeyError(f"{device_id}'s update in round {round_id}")
        return fed.update_record(row)

    def fed_round_counts(self) -> dict[str, int]:
        return self._run(
            lambda sql: fed.counts(sql, "fed_rounds", "state", fed.round_states()), write=False
        )

    def fed_update_counts(self) -> dict[str, int]:
        return self._run(
            lambda sql: fed.counts(sql, "fed_updates", "status", fed.update_statuses()),
            write=False,
        )

    # -- the model catalogue and the closed loop (the SQL is in catalogue.py) ----------------
    # Checks run before the transaction: a ValueError inside one would come out as StoreRefused.

    def add_model(self, record: ModelRecord) -> None:
        catalogue.check_model_name(record.name)
        if not self._run(lambda sql: catalogue.add_model(sql, record), write=True):
            raise ValueError(f"model {record.name!r} is already in the catalogue")

    def model(self, name: str) -> ModelRecord | None:
        found = self._read(
            f"SELECT {catalogue.MODEL_COLUMNS} FROM catalogue_models WHERE name = ?", (name,)
        )
        return catalogue.model_record(found[0]) if found else None

    def models(self) -> list[ModelRecord]:
        found = self._read(f"SELECT {catalogue.MODEL_COLUMNS} FROM catalogue_models ORDER BY name")
        return [catalogue.model_record(r) for r in found]

    def add_variant(self, record: VariantRecord) -> None:
        refused = self._run(lambda sql: catalogue.add_variant(sql, record), write=True)
        if refused is not None:
            raise ValueError(refused)

    def variant(self, variant_id: str) -> VariantRecord | None:
        found = self._read(
            f"SELECT {catalogue.VARIANT_COLUMNS} FROM variants WHERE variant_id = ?",
            (variant_id,),
        )
        return catalogue.variant_record(found[0]) if found else None

    def variants(self, model: str | None = None) -> list[VariantRecord]:
        found = self._run(lambda sql: catalogue.variants_query(sql, model), write=False)
        return [catalogue.variant_record(r) for r in found]

    def variant_by_manifest(self, manifest_sha256: str) -> VariantRecord | None:
        found = self._read(
            f"SELECT {catalogue.VARIANT_COLUMNS} FROM variants WHERE manifest_sha256 = ?",
            (manifest_sha256,),
        )
        return catalogue.variant_record(found[0]) if found else None

    def retire_variant(self, variant_id: str, at: float | None) -> None:
        changed = self._run(
            lambda sql: sql.run(
                "UPDATE variants SET retired_at = ? WHERE variant_id = ?", (at, variant_id)
            ),
            write=True,
        )
        if changed == 0:
            raise KeyError(variant_id)

    def create_job(self, record: BuildJobRecord) -> None:
        catalogue.check_job_state(record.state)
        catalogue.check_origin(record.origin)
        self._run(lambda sql: catalogue.create_job(sql, record), write=True)

    def job(self, job_id: str) -> BuildJobRecord | None:
        found = self._read(
            f"SELECT {catalogue.JOB_COLUMNS} FROM build_jobs WHERE job_id = ?", (job_id,)
        )
        return catalogue.job_record(found[0]) if found else None

    def jobs(
        self,
        model: str | None = None,
        states: Sequence[JobState] | None = None,
        limit: int = 100,
    ) -> list[BuildJobRecord]:
        for s in states or ():
            catalogue.check_job_state(s)
        found = self._run(lambda sql: catalogue.jobs_query(sql, model, states, limit), write=False)
        return [catalogue.job_record(r) for r in found]

    def update_job(
        self,
        job_id: str,
        *,
        only_if: Sequence[JobState] | None = None,
        state: JobState | None = None,
        step: int | None = None,
        steps: int | None = None,
        progress: str | None = None,
        variant_id: str | None = None,
        reason: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> BuildJobRecord | None:
        for checked in (state, *(only_if or ())):
            if checked is not None:
                catalogue.check_job_state(checked)
        changes = {
            "state": state,
            "step": step,
            "steps": steps,
            "progress": progress,
            "variant_id": variant_id,
            "reason": reason,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        row = self._run(lambda sql: catalogue.update_job(sql, job_id, only_if, changes), write=True)
        return None if row is None else catalogue.job_record(row)

    def set_target(self, target: GroupTarget) -> None:
        self._run(lambda sql: catalogue.set_target(sql, target), write=True)

    def target(self, group: str) -> GroupTarget | None:
        found = self._read(
            f"SELECT {catalogue.TARGET_COLUMNS} FROM group_targets WHERE device_group = ?",
            (group,),
        )
        return catalogue.target_record(found[0]) if found else None

    def targets(self) -> list[GroupTarget]:
        found = self._read(
            f"SELECT {catalogue.TARGET_COLUMNS} FROM group_targets ORDER BY device_group"
        )
        return [catalogue.target_record(r) for r in found]

    def put_latency(self, record: LatencyRecord) -> None:
        self._run(lambda sql: catalogue.put_latency(sql, record), write=True)

    def latencies(self, manifest_sha256: str | None = None) -> list[LatencyRecord]:
        found = self._run(lambda sql: catalogue.latencies_query(sql, manifest_sha256), write=False)
        return [catalogue.latency_record(r) for r in found]

    def add_decision(
        self,
        group: str,
        ts: float,
        action: DecisionAction,
        devices: Sequence[str],
        message: str,
        details_json: str,
        rollout_id: str | None = None,
        job_id: str | None = None,
    ) -> DecisionRecord:
        catalogue.check_action(action)
        values = catalogue.decision_values(
            group, ts, action, devices, message, details_json, rollout_id, job_id
        )
        decision_id = self._run(lambda sql: catalogue.add_decision(sql, values), write=True)
        return catalogue.decision_record((decision_id, *values))

    def decisions(
        self,
        group: str | None = None,
        since_id: int = 0,
        limit: int = 100,
    ) -> list[DecisionRecord]:
        found = self._run(
            lambda sql: catalogue.decisions_query(sql, group, since_id, limit), write=False
        )
        return [catalogue.decision_record(r) for r in found]

    def decision_counts(self) -> dict[str, int]:
        return self._run(
            lambda sql: fed.counts(sql, "loop_decisions", "action", catalogue.decision_actions()),
            write=False,
        )

    def _read(self, query: str, params: tuple[object, ...] = ()) -> list[Row]:
        return self._run(lambda sql: sql.rows(query, params), write=False)


def _version(sql: Sql) -> int:
    return int(sql.one("SELECT coalesce(max(version), 0) FROM schema_version")[0])
