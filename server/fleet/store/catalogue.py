"""The model catalogue, group targets, latency per device class and the loop's decisions in
SQL, written once for every backend (schema v6).

One open build job per model is the database's rule, as one active rollout per group is:
the partial unique index build_jobs_one_open (model WHERE state IN ('queued', 'running')).
The insert names it as its conflict target and does nothing on a conflict, so the loser of
two coordinators racing for one model reads the holder in a new statement (PostgreSQL makes
it wait for the winner's commit first) and gets a JobConflict naming it.

Values are checked (check_*) by the caller before its transaction: a ValueError raised inside
one would come out as StoreRefused (errors.py), and these are the caller's mistakes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import get_args

from edgefleet.server.fleet.store.catalogue_base import (
    OPEN_JOB_STATES,
    BuildJobRecord,
    DecisionAction,
    DecisionRecord,
    GroupTarget,
    JobOrigin,
    JobState,
    LatencyRecord,
    ModelRecord,
    VariantRecord,
)
from edgefleet.server.fleet.store.errors import JobConflict
from edgefleet.server.fleet.store.sql import Row, Sql

MODEL_COLUMNS = (
    "name, source_sha256, source_path, source_bytes, data_sha256, data_path, data_bytes, "
    "options_json, added_at"
)
JOB_COLUMNS = (
    "job_id, model, origin, options_json, state, step, steps, progress, log_path, variant_id, "
    "reason, created_at, started_at, finished_at, updated_at"
)
VARIANT_COLUMNS = (
    "variant_id, model, version, model_id, bundle_sha256, manifest_sha256, job_id, "
    "options_json, size_bytes, macs, points_json, default_point, estimate_json, created_at, "
    "retired_at"
)
TARGET_COLUMNS = "device_group, p95_ms, min_accuracy, max_power_w, loop, pinned_variant, updated_at"
LATENCY_COLUMNS = (
    "manifest_sha256, device_class, operating_point, windows, devices, p95_ms, p50_ms, "
    "power_w, predicted_p95_ms, updated_at"
)
DECISION_COLUMNS = (
    "decision_id, device_group, ts, action, devices_json, message, details_json, rollout_id, job_id"
)
_OPEN = "state IN ('queued', 'running')"  # must match the index's predicate exactly
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _marks(columns: str) -> str:
    return ", ".join("?" * len(columns.split(",")))


# -- models and variants -----------------------------------------------------------------------


def add_model(sql: Sql, r: ModelRecord) -> bool:
    """Insert a model; False when the name is taken."""
    values = (
        r.name,
        r.source_sha256,
        r.source_path,
        r.source_bytes,
        r.data_sha256,
        r.data_path,
        r.data_bytes,
        r.options_json,
        r.added_at,
    )
    inserted = sql.run(
        f"INSERT INTO catalogue_models ({MODEL_COLUMNS}) VALUES ({_marks(MODEL_COLUMNS)}) "
        "ON CONFLICT (name) DO NOTHING",
        values,
    )
    return inserted == 1


def model_record(row: Row) -> ModelRecord:
    return ModelRecord(
        name=str(row[0]),
        source_sha256=str(row[1]),
        source_path=str(row[2]),
        source_bytes=int(row[3]),
        data_sha256=str(row[4]),
        data_path=str(row[5]),
        data_bytes=int(row[6]),
        options_json=str(row[7]),
        added_at=float(row[8]),
    )


def add_variant(sql: Sql, r: VariantRecord) -> str | None:
    """Insert a variant; None, or why it was refused (its id or its manifest is taken)."""
    values = (
        r.variant_id,
        r.model,
        r.version,
        r.model_id,
        r.bundle_sha256,
        r.manifest_sha256,
        r.job_id,
        r.options_json,
        r.size_bytes,
        r.macs,
        r.points_json,
        r.default_point,
        r.estimate_json,
        r.created_at,
        r.retired_at,
    )
    # No conflict target: either unique key (variant_id, manifest_sha256) refuses the row.
    if sql.run(
        f"INSERT INTO variants ({VARIANT_COLUMNS}) VALUES ({_marks(VARIANT_COLUMNS)}) "
        "ON CONFLICT DO NOTHING",
        values,
    ):
        return None
    if sql.rows("SELECT 1 FROM variants WHERE variant_id = ?", (r.variant_id,)):
        return f"variant {r.variant_id!r} is already registered"
    holder = sql.rows(
        "SELECT variant_id FROM variants WHERE manifest_sha256 = ?", (r.manifest_sha256,)
    )
    name = str(holder[0][0]) if holder else "(unknown)"
    return f"manifest {r.manifest_sha256} is already registered as variant {name!r}"


def variant_record(row: Row) -> VariantRecord:
    return VariantRecord(
        variant_id=str(row[0]),
        model=str(row[1]),
        version=int(row[2]),
        model_id=str(row[3]),
        bundle_sha256=str(row[4]),
        manifest_sha256=str(row[5]),
        job_id=_str(row[6]),
        options_json=str(row[7]),
        size_bytes=int(row[8]),
        macs=int(row[9]),
        points_json=str(row[10]),
        default_point=int(row[11]),
        estimate_json=str(row[12]),
        created_at=float(row[13]),
        retired_at=_float(row[14]),
    )


def variants_query(sql: Sql, model: str | None) -> list[Row]:
    select = f"SELECT {VARIANT_COLUMNS} FROM variants"
    order = "ORDER BY created_at, model, version, variant_id"
    if model is None:
        return sql.rows(f"{select} {order}")
    return sql.rows(f"{select} WHERE model = ? {order}", (model,))


# -- build jobs --------------------------------------------------------------------------------


def create_job(sql: Sql, r: BuildJobRecord) -> None:
    values = (
        r.job_id,
        r.model,
        r.origin,
        r.options_json,
        r.state,
        r.step,
        r.steps,
        r.progress,
        r.log_path,
        r.variant_id,
        r.reason,
        r.created_at,
        r.started_at,
        r.finished_at,
        r.updated_at,
    )
    inserted = sql.run(
        f"INSERT INTO build_jobs ({JOB_COLUMNS}) VALUES ({_marks(JOB_COLUMNS)}) "
        f"ON CONFLICT (model) WHERE {_OPEN} DO NOTHING",
        values,
    )
    if inserted == 0:
        holder = sql.rows(f"SELECT job_id FROM build_jobs WHERE model = ? AND {_OPEN}", (r.model,))
        raise JobConflict(r.model, str(holder[0][0]) if holder else "(unknown)")


def job_record(row: Row) -> BuildJobRecord:
    return BuildJobRecord(
        job_id=str(row[0]),
        model=str(row[1]),
        origin=row[2],
        options_json=str(row[3]),
        state=row[4],
        step=int(row[5]),
        steps=int(row[6]),
        progress=str(row[7]),
        log_path=str(row[8]),
        variant_id=_str(row[9]),
        reason=_str(row[10]),
        created_at=float(row[11]),
        started_at=_float(row[12]),
        finished_at=_float(row[13]),
        updated_at=float(row[14]),
    )


def jobs_query(
    sql: Sql, model: str | None, states: Sequence[JobState] | None, limit: int
) -> list[Row]:
    # A parameter that may be NULL gets a query of its own: PostgreSQL cannot type "? IS NULL".
    where: list[str] = []
    params: list[object] = []
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if states is not None:
        where.append(f"state {sql.IN_LIST}")
        params.append(sql.as_list(list(states)))
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return sql.rows(
        f"SELECT {JOB_COLUMNS} FROM build_jobs{clause} ORDER BY created_at DESC, job_id LIMIT ?",
        (*params, limit),
    )


def update_job(
    sql: Sql, job_id: str, only_if: Sequence[JobState] | None, changes: Mapping[str, object]
) -> Row | None:
    """Set the non-None changes and updated_at; the row after, None when only_if failed.

    KeyError when there is no such job.
    """
    values: dict[str, object] = {k: v for k, v in changes.items() if v is not None}
    values["updated_at"] = time.time()
    sets = ", ".join(f"{k} = ?" for k in values)
    where = "job_id = ?"
    params: list[object] = [job_id]
    if only_if is not None:
        where += f" AND state {sql.IN_LIST}"
        params.append(sql.as_list(list(only_if)))
    if sql.run(f"UPDATE build_jobs SET {sets} WHERE {where}", (*values.values(), *params)) == 0:
        if not sql.rows("SELECT 1 FROM build_jobs WHERE job_id = ?", (job_id,)):
            raise KeyError(job_id)
        return None
    return sql.one(f"SELECT {JOB_COLUMNS} FROM build_jobs WHERE job_id = ?", (job_id,))


# -- group targets -----------------------------------------------------------------------------


def set_target(sql: Sql, t: GroupTarget) -> None:
    sql.run(
        f"INSERT INTO group_targets ({TARGET_COLUMNS}) VALUES ({_marks(TARGET_COLUMNS)}) "
        "ON CONFLICT (device_group) DO UPDATE SET p95_ms = excluded.p95_ms, "
        "min_accuracy = excluded.min_accuracy, max_power_w = excluded.max_power_w, "
        "loop = excluded.loop, pinned_variant = excluded.pinned_variant, "
        "updated_at = excluded.updated_at",
        (
            t.group,
            t.p95_ms,
            t.min_accuracy,
            t.max_power_w,
            t.loop,
            t.pinned_variant,
            t.updated_at,
        ),
    )


def target_record(row: Row) -> GroupTarget:
    return GroupTarget(
        group=str(row[0]),
        p95_ms=float(row[1]),
        min_accuracy=_float(row[2]),
        max_power_w=_float(row[3]),
        loop=bool(row[4]),
        pinned_variant=_str(row[5]),
        updated_at=float(row[6]),
    )


# -- latency per device class ------------------------------------------------------------------


def put_latency(sql: Sql, r: LatencyRecord) -> None:
    sql.run(
        f"INSERT INTO class_latency ({LATENCY_COLUMNS}) VALUES ({_marks(LATENCY_COLUMNS)}) "
        "ON CONFLICT (manifest_sha256, device_class, operating_point) DO UPDATE SET "
        "windows = excluded.windows, devices = excluded.devices, p95_ms = excluded.p95_ms, "
        "p50_ms = excluded.p50_ms, power_w = excluded.power_w, "
        "predicted_p95_ms = excluded.predicted_p95_ms, updated_at = excluded.updated_at",
        (
            r.manifest_sha256,
            r.device_class,
            r.operating_point,
            r.windows,
            r.devices,
            r.p95_ms,
            r.p50_ms,
            r.power_w,
            r.predicted_p95_ms,
            r.updated_at,
        ),
    )


def latency_record(row: Row) -> LatencyRecord:
    return LatencyRecord(
        manifest_sha256=str(row[0]),
        device_class=str(row[1]),
        operating_point=int(row[2]),
        windows=int(row[3]),
        devices=int(row[4]),
        p95_ms=float(row[5]),
        p50_ms=float(row[6]),
        power_w=_float(row[7]),
        predicted_p95_ms=_float(row[8]),
        updated_at=float(row[9]),
    )


def latencies_query(sql: Sql, manifest_sha256: str | None) -> list[Row]:
    select = f"SELECT {LATENCY_COLUMNS} FROM class_latency"
    order = "ORDER BY manifest_sha256, device_class, operating_point"
    if manifest_sha256 is None:
        return sql.rows(f"{select} {order}")
    return sql.rows(f"{select} WHERE manifest_sha256 = ? {order}", (manifest_sha256,))


# -- decisions ---------------------------------------------------------------------------------


def add_decision(sql: Sql, values: Sequence[object]) -> int:
    """Append a decision (DECISION_COLUMNS without the id); its id."""
    columns = DECISION_COLUMNS.split(", ", 1)[1]
    insert = f"INSERT INTO loop_decisions ({columns}) VALUES ({_marks(columns)})"
    if sql.FOR_UPDATE:
        return int(sql.one(f"{insert} RETURNING decision_id", values)[0])
    # A backend without row locks holds the whole database's write lock: the largest id is the
    # one just inserted. (SQLite has RETURNING only from 3.35; older ones are still shipped.)
    sql.run(insert, values)
    return int(sql.one("SELECT max(decision_id) FROM loop_decisions")[0])


def decision_values(
    group: str,
    ts: float,
    action: DecisionAction,
    devices: Sequence[str],
    message: str,
    details_json: str,
    rollout_id: str | None,
    job_id: str | None,
) -> tuple[object, ...]:
    return (
        group,
        ts,
        action,
        json.dumps(list(devices)),
        message,
        details_json,
        rollout_id,
        job_id,
    )


def decision_record(row: Row) -> DecisionRecord:
    return DecisionRecord(
        decision_id=int(row[0]),
        group=str(row[1]),
        ts=float(row[2]),
        action=row[3],
        devices=tuple(str(d) for d in json.loads(str(row[4]))),
        message=str(row[5]),
        details_json=str(row[6]),
        rollout_id=_str(row[7]),
        job_id=_str(row[8]),
    )


def decisions_query(sql: Sql, group: str | None, since_id: int, limit: int) -> list[Row]:
    select = f"SELECT {DECISION_COLUMNS} FROM loop_decisions WHERE decision_id > ?"
    order = "ORDER BY decision_id DESC LIMIT ?"
    if group is None:
        return sql.rows(f"{select} {order}", (since_id, limit))
    return sql.rows(f"{select} AND device_group = ? {order}", (since_id, group, limit))


def decision_actions() -> tuple[str, ...]:
    return get_args(DecisionAction)


# -- checks, before a transaction --------------------------------------------------------------


def check_model_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: letters, digits, '_', '.', '-', "
            "starting with a letter or digit, at most 64 characters"
        )


def check_job_state(state: str) -> None:
    if state not in get_args(JobState):
        raise ValueError(f"unknown build job state {state!r}; one of {get_args(JobState)}")


def check_origin(origin: str) -> None:
    if origin not in get_args(JobOrigin):
        raise ValueError(f"unknown build job origin {origin!r}; one of {get_args(JobOrigin)}")


def check_action(action: str) -> None:
    if action not in get_args(DecisionAction):
        raise ValueError(f"unknown decision action {action!r}; one of {get_args(DecisionAction)}")


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


assert set(OPEN_JOB_STATES) == {"queued", "running"}  # _OPEN and the index say so
