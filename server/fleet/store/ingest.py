"""The ingest algorithm, once for every backend: one batch, one write transaction.

Exactly once comes from the database: telemetry and events are inserted keyed by
(device_id, seq) and only the rows that were new come back, so a redelivered or replayed
message is a counted duplicate whichever coordinator stored it first. Everything the batch
decides about a device (status order, sequence bounds, counters) is made under that device's
row lock (PostgreSQL) or the database write lock (SQLite), from what logic.py says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edgefleet.server.fleet.store import fed, logic, losses
from edgefleet.server.fleet.store.base import IngestBatch, IngestOutcome, Reject
from edgefleet.server.fleet.store.delta import TelemetryJson, device_deltas
from edgefleet.server.fleet.store.sql import (
    BOOT_IDS,
    EVENTS,
    NEW_DEVICES,
    REJECT_COUNTS,
    REJECTS,
    REPLIES,
    TELEMETRY,
    Sql,
)

_NEW_DEVICE = logic.DeviceState(None, None, None, 0, 0)


def write(
    sql: Sql, batch: IngestBatch, *, registration_open: bool, tolerance_s: float
) -> IngestOutcome:
    """Write one batch inside the open transaction sql; see Store.ingest."""
    span = logic.seen_span(batch)
    states, registered = _claim_devices(sql, span, registration_open)
    accepted, turned_away = logic.split_unregistered(batch, states.keys())

    folds = _apply_statuses(sql, accepted, states)
    tallies = _insert_telemetry(sql, accepted, tolerance_s)
    unlost: dict[str, tuple[int, int]] = {}
    for device_id, tally in tallies.items():
        state = states[device_id]
        seqs = logic.lost_candidates(tally, state.lost + state.dropped, state.max_seq)
        if seqs:
            unlost[device_id] = losses.unlose(sql, device_id, seqs)
    event_counts = _insert_events(sql, accepted)
    if accepted.replies:
        sql.insert(
            REPLIES,
            [
                (r.reply.id, r.reply.device_id, r.received_at, r.reply.model_dump_json())
                for r in accepted.replies
            ],
            "ON CONFLICT (command_id, device_id) DO NOTHING",
        )

    deltas = device_deltas(span, states.keys(), folds, tallies, unlost)
    if deltas:
        json_of = TelemetryJson(accepted.telemetry)
        sql.update_devices([d.params(json_of) for d in deltas])
    _write_rejects(sql, accepted.rejects)
    # Updates neither register nor touch a device: their round decides (fed.py).
    fed_kept, fed_ignored = fed.ingest_updates(sql, batch.fed_updates)

    return IngestOutcome(
        telemetry_inserted=sum(t.inserted for t in tallies.values()),
        telemetry_duplicates=sum(t.duplicates for t in tallies.values()),
        events_inserted=sum(i for i, _ in event_counts.values()),
        events_duplicates=sum(d for _, d in event_counts.values()),
        devices_registered=tuple(registered),
        unregistered=turned_away,
        id_conflicts=tuple(sorted(d for d, f in folds.items() if f.conflicts)),
        clock_skewed=sum(t.skewed for t in tallies.values()),
        fed_received=fed_kept,
        fed_ignored=tuple(fed_ignored),
    )


def _claim_devices(
    sql: Sql, span: Mapping[str, tuple[float, float]], registration_open: bool
) -> tuple[dict[str, logic.DeviceState], list[str]]:
    """Lock and read the batch's known devices; register the unknown ones when open.

    Returns the state of every device whose messages may be written, and the ids registered.
    Rows are locked in device id order, so two batches sharing devices queue rather than
    deadlock.
    """
    ids = sorted(span)
    if not ids:
        return {}, []
    states = _lock_devices(sql, ids)
    new = [d for d in ids if d not in states]
    if not registration_open or not new:
        return states, []
    registered = sorted(
        str(k[0]) for k in sql.insert_new(NEW_DEVICES, [(d, span[d][0], *span[d]) for d in new])
    )
    states.update(dict.fromkeys(registered, _NEW_DEVICE))
    # Registered meanwhile by another coordinator (PostgreSQL): the insert waited for its
    # commit, so the row can be locked and read now.
    raced = [d for d in new if d not in states]
    if raced:
        states.update(_lock_devices(sql, raced))
    return states, registered


def _lock_devices(sql: Sql, ids: Sequence[str]) -> dict[str, logic.DeviceState]:
    rows = sql.rows(
        "SELECT device_id, boot_id, status_received_at, max_seq, lost, dropped FROM devices "
        f"WHERE device_id {sql.IN_LIST} ORDER BY device_id{sql.FOR_UPDATE}",
        (sql.as_list(ids),),
    )
    return {
        str(d): logic.DeviceState(boot_id, status_at, max_seq, int(lost), int(dropped))
        for d, boot_id, status_at, max_seq, lost, dropped in rows
    }


def _apply_statuses(
    sql: Sql, accepted: IngestBatch, states: Mapping[str, logic.DeviceState]
) -> dict[str, logic.StatusFold]:
    """Fold each device's statuses in arrival order and remember the boot ids seen."""
    by_device = logic.statuses_by_device(accepted.statuses)
    if not by_device:
        return {}
    ids = sorted(by_device)
    # Boots in the order this coordinator first saw them: how statuses are ordered.
    seen: dict[str, dict[str, float]] = {d: {} for d in ids}
    for device_id, boot_id, first_seen in sql.rows(
        f"SELECT device_id, boot_id, first_seen FROM boot_ids WHERE device_id {sql.IN_LIST}",
        (sql.as_list(ids),),
    ):
        seen[str(device_id)][str(boot_id)] = float(first_seen)
    folds: dict[str, logic.StatusFold] = {}
    boots: list[tuple[str, str, float, float]] = []
    for device_id in ids:
        fold = logic.fold_statuses(states[device_id].status, seen[device_id], by_device[device_id])
        folds[device_id] = fold
        boots.extend((device_id, b, lo, hi) for b, (lo, hi) in sorted(fold.boots.items()))
    sql.insert(
        BOOT_IDS,
        boots,
        "ON CONFLICT (device_id, boot_id) DO UPDATE SET "
        f"first_seen = {sql.LEAST}(boot_ids.first_seen, excluded.first_seen), "
        f"last_seen = {sql.GREATEST}(boot_ids.last_seen, excluded.last_seen)",
    )
    return folds


def _insert_telemetry(
    sql: Sql, accepted: IngestBatch, tolerance_s: float
) -> dict[str, logic.TelemetryTally]:
    if not accepted.telemetry:
        return {}
    rows = [
        (
            m.telemetry.device_id,
            m.telemetry.seq,
            m.received_at,
            m.telemetry.window_start,
            m.telemetry.window_end,
            m.telemetry.frames_processed,
            m.telemetry.fps,
            m.telemetry.latency_ms.p95,
            m.telemetry.power_w,
            m.raw if m.raw is not None else m.telemetry.model_dump_json(),
        )
        for m in accepted.telemetry
    ]
    inserted = {(k[0], k[1]) for k in sql.insert_new(TELEMETRY, rows)}
    return logic.tally_telemetry(accepted.telemetry, inserted, tolerance_s)


def _insert_events(sql: Sql, accepted: IngestBatch) -> dict[str, tuple[int, int]]:
    if not accepted.events:
        return {}
    rows = [
        (e.event.device_id, e.event.seq, e.received_at, e.event.kind, e.event.model_dump_json())
        for e in accepted.events
    ]
    inserted = {(k[0], k[1]) for k in sql.insert_new(EVENTS, rows)}
    return logic.count_inserted(logic.event_keys(accepted.events), inserted)


def _write_rejects(sql: Sql, rejects: Sequence[Reject]) -> None:
    if not rejects:
        return
    sql.insert(
        REJECTS, [(r.received_at, r.topic, r.device_id, r.reason, r.detail) for r in rejects]
    )
    sql.insert(
        REJECT_COUNTS,
        sorted(logic.reject_tally(rejects).items()),
        "ON CONFLICT (reason) DO UPDATE SET n = reject_counts.n + excluded.n",
    )
    # The newest rows have the highest ids; the subquery is NULL while under the cap.
    sql.run(
        "DELETE FROM rejects WHERE id <= "
        "(SELECT id FROM rejects ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (logic.MAX_REJECT_ROWS,),
    )
