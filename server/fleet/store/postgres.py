"""The store in PostgreSQL, shared by several coordinator processes.

Each store object holds one connection guarded by a lock. Correctness across processes comes
from the database, never from this process:
- telemetry and events are inserted with ON CONFLICT (device_id, seq) DO NOTHING RETURNING,
  so exactly one writer stores a (device, seq) and every other counts it as a duplicate;
- an ingest locks the rows of its devices (SELECT ... FOR UPDATE, in device id order, so two
  batches sharing devices queue instead of deadlocking) before it reads the status to compare
  with, the boot ids seen and the lost ranges, and writes counters as x = x + n;
- retention moves raw windows with DELETE ... RETURNING inside the statement that adds them
  to the rollups, so a window another coordinator already moved is not added twice.
Batches go as arrays through unnest(): one statement per table whatever the batch size.
The arrays are sent in binary (%b): in text form psycopg escapes every JSON payload with a
regex, which made a 500-message batch about four times slower.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar, get_args

import psycopg
from psycopg import errors
from psycopg.rows import TupleRow

from edgefleet.agent.protocol import Event, Reply, Telemetry
from edgefleet.server.fleet.store import logic
from edgefleet.server.fleet.store.base import (
    CommandRecord,
    DeviceRecord,
    EventRecord,
    IngestBatch,
    IngestOutcome,
    Reject,
    RejectReason,
    RetentionOutcome,
    RetentionPolicy,
    RollupRecord,
    SequenceReport,
    Store,
    TelemetryRecord,
)
from edgefleet.server.fleet.store.schema import VERSION_TABLE_POSTGRES, pending

_T = TypeVar("_T")
Cursor = psycopg.Cursor[TupleRow]

DAY_S = 86_400.0
# Keys of transaction-scoped advisory locks: one coordinator at a time migrates, declares
# losses or applies retention (the others wait, then find the work done).
_MIGRATE_LOCK = 0x6564_6765_0001
_LOSSES_LOCK = 0x6564_6765_0002
_RETENTION_LOCK = 0x6564_6765_0003
# Ordered locking makes deadlocks unexpected; a retry keeps a surprise from losing a batch.
_RETRIES = 3


_UPDATE_DEVICES = """
UPDATE devices AS d SET
    first_seen = LEAST(d.first_seen, u.first_seen),
    last_seen = GREATEST(d.last_seen, u.last_seen),
    online = COALESCE(u.online, d.online),
    status_json = COALESCE(u.status_json, d.status_json),
    status_ts = CASE WHEN u.status_json IS NULL THEN d.status_ts ELSE u.status_ts END,
    boot_id = COALESCE(u.boot_id, d.boot_id),
    device_group = COALESCE(u.device_group, d.device_group),
    id_conflicts = d.id_conflicts + u.id_conflicts,
    first_seq = LEAST(d.first_seq, u.first_seq),
    max_seq = GREATEST(d.max_seq, u.max_seq),
    received = d.received + u.received,
    duplicates = d.duplicates + u.duplicates,
    lost = d.lost - u.unlost,
    reported_overflow = GREATEST(d.reported_overflow, u.overflow),
    last_telemetry_json = CASE
        WHEN u.newest_seq IS NOT NULL
             AND (d.last_telemetry_seq IS NULL OR u.newest_seq > d.last_telemetry_seq)
        THEN u.newest_json ELSE d.last_telemetry_json END,
    last_telemetry_seq = GREATEST(d.last_telemetry_seq, u.newest_seq)
FROM unnest(
    %(device_id)b::text[], %(first_seen)b::float8[], %(last_seen)b::float8[],
    %(online)b::bool[], %(status_json)b::text[], %(status_ts)b::float8[],
    %(boot_id)b::text[], %(device_group)b::text[], %(id_conflicts)b::int8[],
    %(first_seq)b::int8[], %(max_seq)b::int8[], %(received)b::int8[],
    %(duplicates)b::int8[], %(unlost)b::int8[], %(overflow)b::int8[],
    %(newest_seq)b::int8[], %(newest_json)b::text[]
) AS u(device_id, first_seen, last_seen, online, status_json, status_ts, boot_id,
       device_group, id_conflicts, first_seq, max_seq, received, duplicates, unlost,
       overflow, newest_seq, newest_json)
WHERE d.device_id = u.device_id
"""

_INSERT_TELEMETRY = """
INSERT INTO telemetry (device_id, seq, received_at, window_start, window_end,
                       frames_processed, fps, p95_ms, power_w, payload)
SELECT * FROM unnest(%b::text[], %b::int8[], %b::float8[], %b::float8[], %b::float8[],
                     %b::int8[], %b::float8[], %b::float8[], %b::float8[], %b::text[])
ON CONFLICT (device_id, seq) DO NOTHING
RETURNING device_id, seq
"""

# See the SQLite twin: the gap's age is the arrival of the window just above it.
_GAPS = """
SELECT device_id, prev_seq + 1, seq - 1 FROM (
    SELECT device_id, seq, received_at,
           lag(seq) OVER (PARTITION BY device_id ORDER BY seq) AS prev_seq
    FROM telemetry
    WHERE device_id = ANY(%s)
) AS t
WHERE prev_seq IS NOT NULL AND seq > prev_seq + 1 AND received_at < %s
ORDER BY device_id, seq
"""

_ROLL_UP = """
WITH moved AS (
    DELETE FROM telemetry WHERE received_at < %(raw_cutoff)s
    RETURNING device_id, received_at, window_start, window_end, frames_processed, fps,
              p95_ms, power_w
), sums AS (
    SELECT device_id, floor(received_at / %(bucket)s) * %(bucket)s AS bucket_start,
           count(*) AS windows, sum(frames_processed) AS frames_processed,
           sum(fps) AS fps_sum, max(p95_ms) AS p95_max,
           coalesce(sum(power_w), 0) AS power_sum, count(power_w) AS power_n,
           coalesce(sum(power_w * (window_end - window_start)), 0) AS energy_j
    FROM moved
    WHERE floor(received_at / %(bucket)s) * %(bucket)s >= %(keep)s
    GROUP BY 1, 2
), added AS (
    INSERT INTO rollups (device_id, bucket_start, windows, frames_processed, fps_sum,
                         p95_max, power_sum, power_n, energy_j)
    SELECT * FROM sums
    ON CONFLICT (device_id, bucket_start) DO UPDATE SET
        windows = rollups.windows + EXCLUDED.windows,
        frames_processed = rollups.frames_processed + EXCLUDED.frames_processed,
        fps_sum = rollups.fps_sum + EXCLUDED.fps_sum,
        p95_max = GREATEST(rollups.p95_max, EXCLUDED.p95_max),
        power_sum = rollups.power_sum + EXCLUDED.power_sum,
        power_n = rollups.power_n + EXCLUDED.power_n,
        energy_j = rollups.energy_j + EXCLUDED.energy_j
)
SELECT (SELECT count(*) FROM moved), (SELECT coalesce(sum(windows), 0) FROM sums)
"""


class PostgresStore(Store):
    """Store in a PostgreSQL database; dsn is a URL or a libpq keyword string.

    The connection is opened again on the next call after it broke (a database restart):
    the call that saw the break fails, so the caller's retry is what recovers.
    """

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        self._conn: psycopg.Connection[TupleRow] | None = self._connect()

    # -- plumbing -------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[TupleRow]:
        # autocommit: each method opens its own transaction block with conn.transaction().
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=self._connect_timeout_s)

    def _run(self, body: Callable[[Cursor], _T]) -> _T:
        """Run body in one transaction, again after a deadlock or serialization failure."""
        with self._lock:
            for attempt in range(_RETRIES):
                if self._closed:
                    raise RuntimeError("the store is closed")
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                try:
                    with self._conn.transaction(), self._conn.cursor() as cur:
                        return body(cur)
                except (errors.DeadlockDetected, errors.SerializationFailure):
                    if attempt == _RETRIES - 1:
                        raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- schema ---------------------------------------------------------------------------

    def migrate(self) -> int:
        def step(cur: Cursor) -> int | None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
            cur.execute(VERSION_TABLE_POSTGRES)
            current = _version(cur)
            todo = pending(current)
            if not todo:
                return current
            m = todo[0]
            # Without parameters psycopg sends the script as one simple query: many statements.
            cur.execute(m.postgres_sql)
            cur.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (%s, %s, %s)",
                (m.version, m.description, time.time()),
            )
            return None

        while True:
            done = self._run(step)
            if done is not None:
                return done

    def schema_version(self) -> int:
        def read(cur: Cursor) -> int:
            exists = _one(cur.execute("SELECT to_regclass('schema_version') IS NOT NULL"))
            return _version(cur) if exists else 0

        return self._run(read)

    # -- writing --------------------------------------------------------------------------

    def ingest(self, batch: IngestBatch, *, registration_open: bool = True) -> IngestOutcome:
        return self._run(lambda cur: self._ingest(cur, batch, registration_open))

    def _ingest(self, cur: Cursor, batch: IngestBatch, registration_open: bool) -> IngestOutcome:
        span = logic.seen_span(batch)
        ids = sorted(span)
        registered: list[str] = []
        if registration_open and ids:
            cur.execute(
                "INSERT INTO devices (device_id, registered_at, first_seen, last_seen) "
                "SELECT u.id, u.lo, u.lo, u.hi "
                "FROM unnest(%b::text[], %b::float8[], %b::float8[]) AS u(id, lo, hi) "
                "ORDER BY u.id "
                "ON CONFLICT (device_id) DO NOTHING RETURNING device_id",
                (ids, [span[d][0] for d in ids], [span[d][1] for d in ids]),
            )
            registered = sorted(str(r[0]) for r in cur.fetchall())
        states: dict[str, logic.DeviceState] = {}
        if ids:
            for device_id, boot_id, status_ts, max_seq, lost in cur.execute(
                "SELECT device_id, boot_id, status_ts, max_seq, lost FROM devices "
                "WHERE device_id = ANY(%s) ORDER BY device_id FOR UPDATE",
                (ids,),
            ).fetchall():
                states[str(device_id)] = logic.DeviceState(boot_id, status_ts, max_seq, int(lost))
        accepted, turned_away = logic.split_unregistered(batch, states.keys())

        folds = self._apply_statuses(cur, accepted, states)
        tallies = self._insert_telemetry(cur, accepted)
        unlost: dict[str, int] = {}
        for device_id, tally in tallies.items():
            state = states[device_id]
            seqs = logic.lost_candidates(tally, state.lost, state.max_seq)
            if seqs:
                unlost[device_id] = _unlose(cur, device_id, seqs)

        event_counts = self._insert_events(cur, accepted)
        if accepted.replies:
            cur.execute(
                "INSERT INTO replies (command_id, device_id, received_at, payload) "
                "SELECT * FROM unnest(%b::text[], %b::text[], %b::float8[], %b::text[]) "
                "ON CONFLICT (command_id, device_id) DO NOTHING",
                _columns(
                    [
                        (r.reply.id, r.reply.device_id, r.received_at, r.reply.model_dump_json())
                        for r in accepted.replies
                    ],
                    4,
                ),
            )

        deltas = logic.device_deltas(span, states.keys(), folds, tallies, unlost)
        if deltas:
            json_of = logic.TelemetryJson(accepted.telemetry)
            params = [d.params(json_of) for d in deltas]
            cur.execute(_UPDATE_DEVICES, {k: [p[k] for p in params] for k in params[0]})
        _write_rejects(cur, accepted.rejects)

        return IngestOutcome(
            telemetry_inserted=sum(t.inserted for t in tallies.values()),
            telemetry_duplicates=sum(t.duplicates for t in tallies.values()),
            events_inserted=sum(i for i, _ in event_counts.values()),
            events_duplicates=sum(d for _, d in event_counts.values()),
            devices_registered=tuple(registered),
            unregistered=turned_away,
            id_conflicts=tuple(sorted(d for d, f in folds.items() if f.conflicts)),
            clock_skewed=sum(t.skewed for t in tallies.values()),
        )

    def _apply_statuses(
        self, cur: Cursor, accepted: IngestBatch, states: dict[str, logic.DeviceState]
    ) -> dict[str, logic.StatusFold]:
        by_device = logic.statuses_by_device(accepted.statuses)
        if not by_device:
            return {}
        seen: dict[str, set[str]] = {d: set() for d in by_device}
        for device_id, boot_id in cur.execute(
            "SELECT device_id, boot_id FROM boot_ids WHERE device_id = ANY(%s)",
            (sorted(by_device),),
        ).fetchall():
            seen[str(device_id)].add(str(boot_id))
        folds: dict[str, logic.StatusFold] = {}
        boots: list[tuple[str, str, float, float]] = []
        for device_id, items in sorted(by_device.items()):
            state = states[device_id]
            fold = logic.fold_statuses(state.status, seen[device_id], items)
            folds[device_id] = fold
            boots.extend((device_id, b, lo, hi) for b, (lo, hi) in sorted(fold.boots.items()))
        cur.execute(
            "INSERT INTO boot_ids (device_id, boot_id, first_seen, last_seen) "
            "SELECT * FROM unnest(%b::text[], %b::text[], %b::float8[], %b::float8[]) "
            "ON CONFLICT (device_id, boot_id) DO UPDATE SET "
            "first_seen = LEAST(boot_ids.first_seen, EXCLUDED.first_seen), "
            "last_seen = GREATEST(boot_ids.last_seen, EXCLUDED.last_seen)",
            _columns(boots, 4),
        )
        return folds

    def _insert_telemetry(
        self, cur: Cursor, accepted: IngestBatch
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
        inserted = {(str(d), int(s)) for d, s in cur.execute(_INSERT_TELEMETRY, _columns(rows, 10))}
        return logic.tally_telemetry(accepted.telemetry, inserted, self.CLOCK_TOLERANCE_S)

    def _insert_events(self, cur: Cursor, accepted: IngestBatch) -> dict[str, tuple[int, int]]:
        if not accepted.events:
            return {}
        rows = [
            (e.event.device_id, e.event.seq, e.received_at, e.event.kind, e.event.model_dump_json())
            for e in accepted.events
        ]
        inserted = {
            (str(d), int(s))
            for d, s in cur.execute(
                "INSERT INTO events (device_id, seq, received_at, kind, payload) "
                "SELECT * FROM unnest(%b::text[], %b::int8[], %b::float8[], %b::text[], "
                "%b::text[]) ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq",
                _columns(rows, 5),
            )
        }
        return logic.count_inserted(logic.event_keys(accepted.events), inserted)

    def register(self, device_id: str, group: str | None = None) -> None:
        def write(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO devices (device_id, device_group, registered_at) "
                "VALUES (%s, %s, %s) ON CONFLICT (device_id) DO UPDATE SET "
                "device_group = COALESCE(EXCLUDED.device_group, devices.device_group)",
                (device_id, group, time.time()),
            )

        self._run(write)

    def set_group(self, device_id: str, group: str | None) -> None:
        def write(cur: Cursor) -> None:
            cur.execute(
                "UPDATE devices SET device_group = %s WHERE device_id = %s", (group, device_id)
            )
            if cur.rowcount == 0:
                raise KeyError(device_id)

        self._run(write)

    def log_command(self, record: CommandRecord) -> None:
        def write(cur: Cursor) -> None:
            cur.execute(
                "INSERT INTO commands (command_id, target, name, body_json, sent_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (command_id) DO NOTHING",
                (record.command_id, record.target, record.name, record.body_json, record.sent_at),
            )

        self._run(write)

    def declare_losses(self, now: float, grace_s: float) -> int:
        def write(cur: Cursor) -> int:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOSSES_LOCK,))
            # Locking the candidates makes an ingest of one of their seqs wait, so a seq is
            # never both declared lost here and counted as received there.
            candidates = [
                str(r[0])
                for r in cur.execute(
                    "SELECT device_id FROM devices WHERE max_seq IS NOT NULL "
                    "AND max_seq - first_seq + 1 - received - lost > 0 "
                    "ORDER BY device_id FOR UPDATE"
                ).fetchall()
            ]
            if not candidates:
                return 0
            gaps = [
                (str(d), int(a), int(b))
                for d, a, b in cur.execute(_GAPS, (candidates, now - grace_s)).fetchall()
            ]
            known: dict[str, list[logic.SeqRange]] = {}
            for d, a, b in cur.execute(
                "SELECT device_id, first_seq, last_seq FROM lost_ranges WHERE device_id = ANY(%s)",
                (sorted({g[0] for g in gaps}),),
            ).fetchall():
                known.setdefault(str(d), []).append((int(a), int(b)))
            new: list[tuple[str, int, int, float]] = []
            per_device: dict[str, int] = {}
            for d, a, b in gaps:
                for lo, hi in logic.uncovered((a, b), known.get(d, [])):
                    new.append((d, lo, hi, now))
                    per_device[d] = per_device.get(d, 0) + hi - lo + 1
            if not new:
                return 0
            cur.execute(
                "INSERT INTO lost_ranges (device_id, first_seq, last_seq, declared_at) "
                "SELECT * FROM unnest(%b::text[], %b::int8[], %b::int8[], %b::float8[])",
                _columns(new, 4),
            )
            devices = sorted(per_device)
            cur.execute(
                "UPDATE devices AS d SET lost = d.lost + u.n "
                "FROM unnest(%b::text[], %b::int8[]) AS u(device_id, n) "
                "WHERE d.device_id = u.device_id",
                (devices, [per_device[d] for d in devices]),
            )
            return sum(per_device.values())

        return self._run(write)

    def apply_retention(self, now: float, policy: RetentionPolicy) -> RetentionOutcome:
        raw_cutoff = now - policy.raw_days * DAY_S
        keep = now - policy.rollup_days * DAY_S

        def write(cur: Cursor) -> RetentionOutcome:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_RETENTION_LOCK,))
            row = cur.execute(
                _ROLL_UP, {"raw_cutoff": raw_cutoff, "bucket": policy.bucket_s, "keep": keep}
            ).fetchone()
            assert row is not None
            deleted, rolled = int(row[0]), int(row[1])
            rollups = cur.execute("DELETE FROM rollups WHERE bucket_start < %s", (keep,)).rowcount
            events = cur.execute(
                "DELETE FROM events WHERE received_at < %s", (now - policy.events_days * DAY_S,)
            ).rowcount
            return RetentionOutcome(
                windows_rolled_up=rolled,
                windows_deleted=deleted,
                rollups_deleted=rollups,
                events_deleted=events,
            )

        return self._run(write)

    # -- reading --------------------------------------------------------------------------

    def devices(self, group: str | None = None) -> list[DeviceRecord]:
        def read(cur: Cursor) -> list[TupleRow]:
            return cur.execute(
                f"SELECT {logic.DEVICE_COLUMNS} FROM devices "
                "WHERE %(g)s::text IS NULL OR device_group = %(g)s ORDER BY device_id",
                {"g": group},
            ).fetchall()

        return [logic.device_record(r) for r in self._run(read)]

    def device(self, device_id: str) -> DeviceRecord | None:
        def read(cur: Cursor) -> TupleRow | None:
            return cur.execute(
                f"SELECT {logic.DEVICE_COLUMNS} FROM devices WHERE device_id = %s", (device_id,)
            ).fetchone()

        row = self._run(read)
        return None if row is None else logic.device_record(row)

    def groups(self) -> dict[str, int]:
        def read(cur: Cursor) -> list[TupleRow]:
            return cur.execute(
                "SELECT device_group, count(*) FROM devices WHERE device_group IS NOT NULL "
                "GROUP BY device_group ORDER BY device_group"
            ).fetchall()

        return {str(g): int(n) for g, n in self._run(read)}

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRecord]:
        def read(cur: Cursor) -> list[TupleRow]:
            return cur.execute(
                "SELECT device_id, seq, received_at, payload FROM telemetry "
                "WHERE device_id = %s ORDER BY seq DESC LIMIT %s",
                (device_id, limit),
            ).fetchall()

        return [
            TelemetryRecord(str(d), int(s), float(t), Telemetry.model_validate_json(p))
            for d, s, t, p in self._run(read)
        ]

    def rollups(self, device_id: str, since: float = 0.0) -> list[RollupRecord]:
        def read(cur: Cursor) -> list[TupleRow]:
            return cur.execute(
                f"SELECT {logic.ROLLUP_COLUMNS} FROM rollups "
                "WHERE device_id = %s AND bucket_start >= %s ORDER BY bucket_start",
                (device_id, since),
            ).fetchall()

        return [logic.rollup_from_row(r) for r in self._run(read)]

    def events(self, device_id: str | None = None, limit: int = 100) -> list[EventRecord]:
        def read(cur: Cursor) -> list[TupleRow]:
            if device_id is None:
                return cur.execute(
                    "SELECT device_id, seq, received_at, payload FROM events "
                    "ORDER BY received_at DESC, device_id, seq DESC LIMIT %s",
                    (limit,),
                ).fetchall()
            return cur.execute(
                "SELECT device_id, seq, received_at, payload FROM events "
                "WHERE device_id = %s ORDER BY seq DESC LIMIT %s",
                (device_id, limit),
            ).fetchall()

        return [
            EventRecord(str(d), int(s), float(t), Event.model_validate_json(p))
            for d, s, t, p in self._run(read)
        ]

    def commands(self, limit: int = 100) -> list[CommandRecord]:
        def read(cur: Cursor) -> tuple[list[TupleRow], list[TupleRow]]:
            rows = cur.execute(
                "SELECT command_id, target, name, body_json, sent_at FROM commands "
                "ORDER BY sent_at DESC, command_id LIMIT %s",
                (limit,),
            ).fetchall()
            replies = cur.execute(
                "SELECT command_id, payload FROM replies WHERE command_id = ANY(%s) "
                "ORDER BY command_id, device_id",
                ([r[0] for r in rows],),
            ).fetchall()
            return rows, replies

        rows, reply_rows = self._run(read)
        replies: dict[str, list[Reply]] = {}
        for command_id, payload in reply_rows:
            replies.setdefault(str(command_id), []).append(Reply.model_validate_json(payload))
        return [logic.command_record(r, replies.get(str(r[0]), [])) for r in rows]

    def sequence_reports(self, device_id: str | None = None) -> list[SequenceReport]:
        def read(cur: Cursor) -> list[TupleRow]:
            return cur.execute(
                f"SELECT {logic.SEQUENCE_COLUMNS} FROM devices WHERE max_seq IS NOT NULL "
                "AND (%(d)s::text IS NULL OR device_id = %(d)s) ORDER BY device_id",
                {"d": device_id},
            ).fetchall()

        return [logic.sequence_report(r) for r in self._run(read)]

    def reject_counts(self) -> dict[str, int]:
        def read(cur: Cursor) -> list[TupleRow]:
            return cur.execute("SELECT reason, n FROM reject_counts").fetchall()

        stored = {str(r): int(n) for r, n in self._run(read)}
        return logic.merged_counts(stored, get_args(RejectReason))

    def telemetry_count(self) -> int:
        def read(cur: Cursor) -> int:
            value = _one(cur.execute("SELECT count(*) FROM telemetry"))
            assert isinstance(value, int)
            return value

        return self._run(read)


def _one(cur: Cursor) -> object:
    """The single value a one-row query returned."""
    row = cur.fetchone()
    if row is None:
        raise RuntimeError("query returned no row")
    return row[0]


def _version(cur: Cursor) -> int:
    value = _one(cur.execute("SELECT coalesce(max(version), 0) FROM schema_version"))
    assert isinstance(value, int)
    return value


def _columns(rows: Sequence[Sequence[object]], width: int) -> list[list[object]]:
    """Rows to one list per column, the shape unnest() takes."""
    return [[row[i] for row in rows] for i in range(width)]


def _unlose(cur: Cursor, device_id: str, seqs: Sequence[int]) -> int:
    """Take arrived seqs out of the device's lost ranges; return how many were lost."""
    ranges = cur.execute(
        "SELECT first_seq, last_seq, declared_at FROM lost_ranges "
        "WHERE device_id = %s AND last_seq >= %s AND first_seq <= %s",
        (device_id, min(seqs), max(seqs)),
    ).fetchall()
    total = 0
    for first, last, declared_at in ranges:
        pieces, removed = logic.remove_seqs([(int(first), int(last))], seqs)
        if not removed:
            continue
        total += removed
        cur.execute(
            "DELETE FROM lost_ranges WHERE device_id = %s AND first_seq = %s", (device_id, first)
        )
        if pieces:
            cur.execute(
                "INSERT INTO lost_ranges (device_id, first_seq, last_seq, declared_at) "
                "SELECT %s, a, b, %s FROM unnest(%b::int8[], %b::int8[]) AS u(a, b)",
                (device_id, declared_at, [p[0] for p in pieces], [p[1] for p in pieces]),
            )
    return total


def _write_rejects(cur: Cursor, rejects: Sequence[Reject]) -> None:
    if not rejects:
        return
    rows = [(r.received_at, r.topic, r.device_id, r.reason, r.detail) for r in rejects]
    cur.execute(
        "INSERT INTO rejects (received_at, topic, device_id, reason, detail) "
        "SELECT * FROM unnest(%b::float8[], %b::text[], %b::text[], %b::text[], %b::text[])",
        _columns(rows, 5),
    )
    counts = sorted(logic.reject_tally(rejects).items())
    cur.execute(
        "INSERT INTO reject_counts (reason, n) "
        "SELECT * FROM unnest(%b::text[], %b::int8[]) "
        "ON CONFLICT (reason) DO UPDATE SET n = reject_counts.n + EXCLUDED.n",
        ([r for r, _ in counts], [n for _, n in counts]),
    )
    # The newest rows have the highest ids; the subquery is NULL while under the cap.
    cur.execute(
        "DELETE FROM rejects WHERE id <= "
        "(SELECT id FROM rejects ORDER BY id DESC OFFSET %s LIMIT 1)",
        (logic.MAX_REJECT_ROWS,),
    )
