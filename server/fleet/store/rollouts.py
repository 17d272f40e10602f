"""Bundles and rollouts in SQL, written once for every backend (schema v4).

One rollout at a time per group is the database's rule, not this process's: the partial
unique index rollouts_one_active (device_group WHERE state IN ('running', 'paused')). The
insert names that index as its conflict target and does nothing on a conflict, so the loser
of two coordinators racing for one group sees zero rows inserted (PostgreSQL makes it wait for
the winner's commit first) and reads the holder in a new statement, which sees the commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import get_args

from edgefleet.server.fleet.store.base import (
    ACTIVE_ROLLOUT_STATES,
    BundleRecord,
    RolloutDeviceRecord,
    RolloutDeviceState,
    RolloutRecord,
    RolloutState,
)
from edgefleet.server.fleet.store.errors import RolloutConflict
from edgefleet.server.fleet.store.sql import Row, Sql

BUNDLE_COLUMNS = (
    "sha256, kind, manifest_sha256, base_manifest_sha256, model_id, version, size, chunk_size, "
    "path, added_at, published_at, cleared_at, published_bytes"
)
ROLLOUT_COLUMNS = (
    "rollout_id, device_group, bundle_sha256, manifest_sha256, model_id, version, spec_json, "
    "state, phase, phase_started_at, reason, created_at, updated_at"
)
DEVICE_COLUMNS = (
    "rollout_id, device_id, wave, state, have, total, reason, previous_manifest_sha256, "
    "sent_at, deadline_at, updated_at"
)
_ACTIVE = "state IN ('running', 'paused')"  # must match the index's predicate exactly


def add_bundle(sql: Sql, r: BundleRecord) -> bool:
    marks = ", ".join("?" * 13)
    return (
        sql.run(
            f"INSERT INTO bundles ({BUNDLE_COLUMNS}) VALUES ({marks}) "
            "ON CONFLICT (sha256) DO NOTHING",
            (
                r.sha256,
                r.kind,
                r.manifest_sha256,
                r.base_manifest_sha256,
                r.model_id,
                r.version,
                r.size,
                r.chunk_size,
                r.path,
                r.added_at,
                r.published_at,
                r.cleared_at,
                r.published_bytes,
            ),
        )
        == 1
    )


def bundle_record(row: Row) -> BundleRecord:
    return BundleRecord(
        sha256=str(row[0]),
        kind=row[1],
        manifest_sha256=str(row[2]),
        base_manifest_sha256=_str(row[3]),
        model_id=str(row[4]),
        version=int(row[5]),
        size=int(row[6]),
        chunk_size=int(row[7]),
        path=str(row[8]),
        added_at=float(row[9]),
        published_at=_float(row[10]),
        cleared_at=_float(row[11]),
        published_bytes=int(row[12]),
    )


def create_rollout(sql: Sql, r: RolloutRecord, waves: Sequence[Sequence[str]]) -> None:
    check_state(r.state)
    inserted = sql.run(
        f"INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ({', '.join('?' * 13)}) "
        f"ON CONFLICT (device_group) WHERE {_ACTIVE} DO NOTHING",
        (
            r.rollout_id,
            r.group,
            r.bundle_sha256,
            r.manifest_sha256,
            r.model_id,
            r.version,
            r.spec_json,
            r.state,
            r.phase,
            r.phase_started_at,
            r.reason,
            r.created_at,
            r.updated_at,
        ),
    )
    if inserted == 0:
        holder = sql.rows(
            f"SELECT rollout_id FROM rollouts WHERE device_group = ? AND {_ACTIVE}", (r.group,)
        )
        raise RolloutConflict(r.group, str(holder[0][0]) if holder else "(unknown)")
    sql.many(
        "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, have, updated_at) "
        "VALUES (?, ?, ?, 'pending', 0, ?)",
        [(r.rollout_id, d, wave, r.created_at) for wave, ds in enumerate(waves) for d in ds],
    )


def rollout_record(row: Row) -> RolloutRecord:
    return RolloutRecord(
        rollout_id=str(row[0]),
        group=str(row[1]),
        bundle_sha256=str(row[2]),
        manifest_sha256=str(row[3]),
        model_id=str(row[4]),
        version=int(row[5]),
        spec_json=str(row[6]),
        state=row[7],
        phase=str(row[8]),
        phase_started_at=float(row[9]),
        reason=_str(row[10]),
        created_at=float(row[11]),
        updated_at=float(row[12]),
    )


def device_record(row: Row) -> RolloutDeviceRecord:
    return RolloutDeviceRecord(
        rollout_id=str(row[0]),
        device_id=str(row[1]),
        wave=int(row[2]),
        state=row[3],
        have=int(row[4]),
        total=None if row[5] is None else int(row[5]),
        reason=_str(row[6]),
        previous_manifest_sha256=_str(row[7]),
        sent_at=_float(row[8]),
        deadline_at=_float(row[9]),
        updated_at=float(row[10]),
    )


def rollouts_query(
    sql: Sql, group: str | None, states: Sequence[RolloutState] | None, limit: int
) -> list[Row]:
    return listed(sql, "rollouts", ROLLOUT_COLUMNS, "rollout_id", group, states, check_state, limit)


def listed(
    sql: Sql,
    table: str,
    columns: str,
    id_column: str,
    group: str | None,
    states: Sequence[str] | None,
    check: Callable[[str], None],
    limit: int,
) -> list[Row]:
    """Rows of a table with device_group and state columns, newest first (rollouts, rounds)."""
    # A parameter that may be NULL gets a query of its own: PostgreSQL cannot type "? IS NULL".
    where: list[str] = []
    params: list[object] = []
    if group is not None:
        where.append("device_group = ?")
        params.append(group)
    if states is not None:
        for s in states:
            check(s)
        where.append(f"state {sql.IN_LIST}")
        params.append(sql.as_list(list(states)))
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return sql.rows(
        f"SELECT {columns} FROM {table}{clause} ORDER BY created_at DESC, {id_column} LIMIT ?",
        (*params, limit),
    )


def update(
    sql: Sql, table: str, key: Mapping[str, str], changes: Mapping[str, object], columns: str
) -> Row | None:
    """Set the non-None changes and updated_at on one row; that row after, or None if absent."""
    values: dict[str, object] = {k: v for k, v in changes.items() if v is not None}
    values["updated_at"] = time.time()
    sets = ", ".join(f"{k} = ?" for k in values)
    where = " AND ".join(f"{k} = ?" for k in key)
    if sql.run(f"UPDATE {table} SET {sets} WHERE {where}", (*values.values(), *key.values())) == 0:
        return None
    return sql.one(f"SELECT {columns} FROM {table} WHERE {where}", tuple(key.values()))


def check_state(state: str) -> None:
    """ValueError for a rollout state the schema does not know (before the database's CHECK)."""
    if state not in get_args(RolloutState):
        raise ValueError(f"unknown rollout state {state!r}; one of {get_args(RolloutState)}")


def check_device_state(state: str) -> None:
    if state not in get_args(RolloutDeviceState):
        raise ValueError(
            f"unknown rollout device state {state!r}; one of {get_args(RolloutDeviceState)}"
        )


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


assert set(ACTIVE_ROLLOUT_STATES) == {"running", "paused"}  # _ACTIVE and the index say so
