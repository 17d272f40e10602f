"""Federated rounds and their updates in SQL, written once for every backend (schema v5).

Which update counts is decided where it is written, in the ingest transaction, against the
round's row read FOR UPDATE (PostgreSQL; SQLite holds the database write lock): an update is
either in its round before the round closes, or it is late. The engine closes a round by
updating that same row, so the two serialize and no update can slip in unseen after the
engine read the round's updates. (round, device, base manifest) is the key: the first update
counts, a redelivery or a second training is a duplicate, never a second vote.

One round per group at a time is the database's rule: the partial unique index
fed_rounds_one_running (device_group WHERE state = 'running'), as for rollouts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import get_args

from edgefleet.server.fleet.store.base import (
    FedIgnored,
    FedRoundRecord,
    FedRoundState,
    FedUpdateIn,
    FedUpdateRecord,
    FedUpdateStatus,
)
from edgefleet.server.fleet.store.errors import FedRoundConflict
from edgefleet.server.fleet.store.rollouts import listed
from edgefleet.server.fleet.store.sql import Row, Sql, Table

ROUND_COLUMNS = (
    "round_id, device_group, state, phase, phase_started_at, spec_json, task_json, model_id, "
    "base_manifest_sha256, base_bundle_sha256, base_version, expected_json, received, "
    "rejected, deadline_at, figures_json, result_version, result_path, result_bundle_sha256, "
    "result_manifest_sha256, rollout_id, reason, created_at, updated_at, closed_at"
)
UPDATE_COLUMNS = (
    "round_id, device_id, base_manifest_sha256, status, reason, samples, norm, received_at, "
    "updated_at"
)
FED_UPDATES = Table(
    "fed_updates",
    (
        "round_id",
        "device_id",
        "base_manifest_sha256",
        "status",
        "reason",
        "samples",
        "norm",
        "received_at",
        "updated_at",
        "payload",
    ),
    ("text", "text", "text", "text", "text", "int8", "float8", "float8", "float8", "text"),
    key=("round_id", "device_id", "base_manifest_sha256"),
)
# Phases in which a round takes updates; any other phase of a running round has closed.
COLLECTING = ("announce", "collect")
_COUNTED = "('received', 'accepted', 'rejected')"
_RECOUNT = (
    "UPDATE fed_rounds SET "
    f"received = (SELECT count(*) FROM fed_updates u WHERE u.round_id = fed_rounds.round_id "
    f"AND u.status IN {_COUNTED}), "
    "rejected = (SELECT count(*) FROM fed_updates u WHERE u.round_id = fed_rounds.round_id "
    "AND u.status = 'rejected') "
)


# -- the ingest side ---------------------------------------------------------------------------


def ingest_updates(
    sql: Sql, updates: Sequence[FedUpdateIn]
) -> tuple[int, list[FedIgnored]]:
    """Store a batch's updates in the open transaction: (kept for aggregation, ignored)."""
    if not updates:
        return 0, []
    ids = sorted({u.update.round_id for u in updates})
    rounds = {
        str(r[0]): (str(r[1]), str(r[2]), str(r[3]), float(r[4]))
        for r in sql.rows(
            "SELECT round_id, state, phase, base_manifest_sha256, deadline_at FROM fed_rounds "
            f"WHERE round_id {sql.IN_LIST} ORDER BY round_id{sql.FOR_UPDATE}",
            (sql.as_list(ids),),
        )
    }
    ignored: list[FedIgnored] = []
    rows: list[tuple[object, ...]] = []
    verdicts: list[tuple[tuple[str, str, str], FedUpdateStatus, str | None]] = []
    for u in updates:
        m = u.update
        known = rounds.get(m.round_id)
        if known is None:
            ignored.append(
                FedIgnored(m.round_id, m.device_id, "unknown_round", "no such round")
            )
            continue
        status, reason = _classify(known, m.base_manifest_sha256, u.received_at)
        payload = (u.raw or m.model_dump_json()) if status == "received" else None
        key = (m.round_id, m.device_id, m.base_manifest_sha256)
        verdicts.append((key, status, reason))
        rows.append(
            (*key, status, reason, m.samples, None, u.received_at, u.received_at, payload)
        )
    inserted = {tuple(str(v) for v in k) for k in sql.insert_new(FED_UPDATES, rows)}
    kept = 0
    for key, status, reason in verdicts:
        round_id, device_id, _base = key
        if key not in inserted:
            ignored.append(
                FedIgnored(
                    round_id,
                    device_id,
                    "duplicate",
                    "an update of this device for the round and base is stored already; "
                    "the first one counts",
                )
            )
            continue
        # A key repeated within the batch is inserted once: its second copy is a duplicate.
        inserted.discard(key)
        if status == "received":
            kept += 1
        elif status == "stale" or status == "late":
            ignored.append(FedIgnored(round_id, device_id, status, reason or status))
    touched = sorted({str(r[0]) for r in rows})
    if touched:
        sql.run(f"{_RECOUNT} WHERE round_id {sql.IN_LIST}", (sql.as_list(touched),))
    return kept, ignored


def _classify(
    round_row: tuple[str, str, str, float], base: str, received_at: float
) -> tuple[FedUpdateStatus, str | None]:
    state, phase, round_base, deadline = round_row
    if state != "running" or phase not in COLLECTING:
        return "late", f"the round is closed ({state}, {phase})"
    if received_at > deadline:
        return "late", f"arrived {received_at - deadline:.1f} s after the deadline"
    if base != round_base:
        return "stale", f"made on base {base[:12]}, the round's is {round_base[:12]}"
    return "received", None


# -- rounds ------------------------------------------------------------------------------------


def create_round(sql: Sql, r: FedRoundRecord) -> None:
    check_state(r.state)
    values = _round_values(r)
    inserted = sql.run(
        f"INSERT INTO fed_rounds ({ROUND_COLUMNS}) VALUES ({', '.join('?' * len(values))}) "
        "ON CONFLICT (device_group) WHERE state = 'running' DO NOTHING",
        values,
    )
    if inserted == 0:
        holder = sql.rows(
            "SELECT round_id FROM fed_rounds WHERE device_group = ? AND state = 'running'",
            (r.group,),
        )
        raise FedRoundConflict(r.group, str(holder[0][0]) if holder else "(unknown)")


def _round_values(r: FedRoundRecord) -> tuple[object, ...]:
    return (
        r.round_id,
        r.group,
        r.state,
        r.phase,
        r.phase_started_at,
        r.spec_json,
        r.task_json,
        r.model_id,
        r.base_manifest_sha256,
        r.base_bundle_sha256,
        r.base_version,
        json.dumps(list(r.expected)),
        r.received,
        r.rejected,
        r.deadline_at,
        r.figures_json,
        r.result_version,
        r.result_path,
        r.result_bundle_sha256,
        r.result_manifest_sha256,
        r.rollout_id,
        r.reason,
        r.created_at,
        r.updated_at,
        r.closed_at,
    )


def round_record(row: Row) -> FedRoundRecord:
    return FedRoundRecord(
        round_id=str(row[0]),
        group=str(row[1]),
        state=row[2],
        phase=str(row[3]),
        phase_started_at=float(row[4]),
        spec_json=str(row[5]),
        task_json=str(row[6]),
        model_id=str(row[7]),
        base_manifest_sha256=str(row[8]),
        base_bundle_sha256=str(row[9]),
        base_version=int(row[10]),
        expected=tuple(str(d) for d in json.loads(str(row[11]))),
        received=int(row[12]),
        rejected=int(row[13]),
        deadline_at=float(row[14]),
        figures_json=_str(row[15]),
        result_version=None if row[16] is None else int(row[16]),
        result_path=_str(row[17]),
        result_bundle_sha256=_str(row[18]),
        result_manifest_sha256=_str(row[19]),
        rollout_id=_str(row[20]),
        reason=_str(row[21]),
        created_at=float(row[22]),
        updated_at=float(row[23]),
        closed_at=None if row[24] is None else float(row[24]),
    )


def rounds_query(
    sql: Sql, group: str | None, states: Sequence[FedRoundState] | None, limit: int
) -> list[Row]:
    return listed(sql, "fed_rounds", ROUND_COLUMNS, "round_id", group, states, check_state, limit)


def update_round(
    sql: Sql,
    round_id: str,
    only_if: FedRoundState | None,
    only_phase: str | None,
    changes: Mapping[str, object],
) -> Row | None:
    """Set the non-None changes and updated_at; the row after, None when a condition failed.

    KeyError when there is no such round.
    """
    values: dict[str, object] = {k: v for k, v in changes.items() if v is not None}
    values["updated_at"] = time.time()
    sets = ", ".join(f"{k} = ?" for k in values)
    where, params = "round_id = ?", [round_id]
    if only_if is not None:
        check_state(only_if)
        where += " AND state = ?"
        params.append(only_if)
    if only_phase is not None:
        where += " AND phase = ?"
        params.append(only_phase)
    if sql.run(f"UPDATE fed_rounds SET {sets} WHERE {where}", (*values.values(), *params)) == 0:
        if not sql.rows("SELECT 1 FROM fed_rounds WHERE round_id = ?", (round_id,)):
            raise KeyError(round_id)
        return None
    return sql.one(f"SELECT {ROUND_COLUMNS} FROM fed_rounds WHERE round_id = ?", (round_id,))


# -- updates -----------------------------------------------------------------------------------


def updates_query(
    sql: Sql, round_id: str, statuses: Sequence[FedUpdateStatus] | None, with_payload: bool
) -> list[Row]:
    columns = UPDATE_COLUMNS + (", payload" if with_payload else "")
    if statuses is None:
        return sql.rows(
            f"SELECT {columns} FROM fed_updates WHERE round_id = ? "
            "ORDER BY device_id, received_at",
            (round_id,),
        )
    for s in statuses:
        check_status(s)
    return sql.rows(
        f"SELECT {columns} FROM fed_updates WHERE round_id = ? AND status {sql.IN_LIST} "
        "ORDER BY device_id, received_at",
        (round_id, sql.as_list(list(statuses))),
    )


def update_record(row: Row) -> FedUpdateRecord:
    return FedUpdateRecord(
        round_id=str(row[0]),
        device_id=str(row[1]),
        base_manifest_sha256=str(row[2]),
        status=row[3],
        reason=_str(row[4]),
        samples=int(row[5]),
        norm=None if row[6] is None else float(row[6]),
        received_at=float(row[7]),
        updated_at=float(row[8]),
        payload=_str(row[9]) if len(row) > 9 else None,
    )


def judge(
    sql: Sql,
    key: tuple[str, str, str],
    status: FedUpdateStatus,
    reason: str | None,
    norm: float | None,
) -> Row | None:
    """Set an update's verdict and recount its round; the row after, None if unknown."""
    check_status(status)
    where = "round_id = ? AND device_id = ? AND base_manifest_sha256 = ?"
    changed = sql.run(
        f"UPDATE fed_updates SET status = ?, reason = ?, norm = ?, updated_at = ? WHERE {where}",
        (status, reason, norm, time.time(), *key),
    )
    if changed == 0:
        return None
    sql.run(f"{_RECOUNT} WHERE round_id = ?", (key[0],))
    return sql.one(f"SELECT {UPDATE_COLUMNS} FROM fed_updates WHERE {where}", key)


def counts(sql: Sql, table: str, column: str, known: tuple[str, ...]) -> dict[str, int]:
    """Rows of table by column, every known value listed (zero included)."""
    found = {
        str(k): int(n)
        for k, n in sql.rows(f"SELECT {column}, count(*) FROM {table} GROUP BY {column}")
    }
    return {k: found.get(k, 0) for k in known}


def round_states() -> tuple[str, ...]:
    return get_args(FedRoundState)


def update_statuses() -> tuple[str, ...]:
    return get_args(FedUpdateStatus)


def check_state(state: str) -> None:
    """ValueError for a round state the schema does not know (before the database's CHECK)."""
    if state not in get_args(FedRoundState):
        raise ValueError(f"unknown round state {state!r}; one of {get_args(FedRoundState)}")


def check_status(status: str) -> None:
    if status not in get_args(FedUpdateStatus):
        raise ValueError(
            f"unknown update status {status!r}; one of {get_args(FedUpdateStatus)}"
        )


def _str(value: object) -> str | None:
    return None if value is None else str(value)
