"""The store in one SQLite file: a single coordinator, or a few on one host.

One connection serves every thread, guarded by a lock; writers take the database write lock
up front (BEGIN IMMEDIATE), so a read-decide-write inside a transaction cannot interleave
with another process's writes. WAL lets readers in other processes go on meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

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
from edgefleet.server.fleet.store.schema import VERSION_TABLE_SQLITE, pending, split_statements

DAY_S = 86_400.0


_UPDATE_DEVICE = """
UPDATE devices SET
    first_seen = min(coalesce(first_seen, :first_seen), :first_seen),
    last_seen = max(coalesce(last_seen, :last_seen), :last_seen),
    online = coalesce(:online, online),
    status_json = coalesce(:status_json, status_json),
    status_ts = CASE WHEN :status_json IS NULL THEN status_ts ELSE :status_ts END,
    boot_id = coalesce(:boot_id, boot_id),
    device_group = coalesce(:device_group, device_group),
    id_conflicts = id_conflicts + :id_conflicts,
    first_seq = CASE WHEN :first_seq IS NULL THEN first_seq
                     ELSE min(coalesce(first_seq, :first_seq), :first_seq) END,
    max_seq = CASE WHEN :max_seq IS NULL THEN max_seq
                   ELSE max(coalesce(max_seq, :max_seq), :max_seq) END,
    received = received + :received,
    duplicates = duplicates + :duplicates,
    lost = lost - :unlost,
    reported_overflow = max(reported_overflow, coalesce(:overflow, 0)),
    last_telemetry_json = CASE
        WHEN :newest_seq IS NOT NULL
             AND (last_telemetry_seq IS NULL OR :newest_seq > last_telemetry_seq)
        THEN :newest_json ELSE last_telemetry_json END,
    last_telemetry_seq = CASE
        WHEN :newest_seq IS NOT NULL
             AND (last_telemetry_seq IS NULL OR :newest_seq > last_telemetry_seq)
        THEN :newest_seq ELSE last_telemetry_seq END
WHERE device_id = :device_id
"""

# Gaps in the raw windows of devices that have unexplained missing seqs. The gap's age is the
# arrival of the window just above it: the newest arrival of all windows above would be
# refreshed by every live window, so a gap of a live device would never grow old.
_GAPS = """
SELECT device_id, prev_seq + 1, seq - 1 FROM (
    SELECT device_id, seq, received_at,
           lag(seq) OVER (PARTITION BY device_id ORDER BY seq) AS prev_seq
    FROM telemetry
    WHERE device_id IN (
        SELECT device_id FROM devices
        WHERE max_seq IS NOT NULL AND max_seq - first_seq + 1 - received - lost > 0
    )
) AS t
WHERE prev_seq IS NOT NULL AND seq > prev_seq + 1 AND received_at < ?
ORDER BY device_id, seq
"""

# CAST truncates, which is floor for the non-negative times the protocol allows.
_ROLL_UP = """
INSERT INTO rollups (device_id, bucket_start, windows, frames_processed, fps_sum, p95_max,
                     power_sum, power_n, energy_j)
SELECT device_id, CAST(received_at / :bucket AS INTEGER) * :bucket AS b, count(*),
       sum(frames_processed), sum(fps), max(p95_ms), coalesce(sum(power_w), 0.0),
       count(power_w), coalesce(sum(power_w * (window_end - window_start)), 0.0)
FROM telemetry
WHERE received_at < :raw_cutoff AND CAST(received_at / :bucket AS INTEGER) * :bucket >= :keep
GROUP BY device_id, b
ON CONFLICT (device_id, bucket_start) DO UPDATE SET
    windows = windows + excluded.windows,
    frames_processed = frames_processed + excluded.frames_processed,
    fps_sum = fps_sum + excluded.fps_sum,
    p95_max = max(p95_max, excluded.p95_max),
    power_sum = power_sum + excluded.power_sum,
    power_n = power_n + excluded.power_n,
    energy_j = energy_j + excluded.energy_j
"""


class SqliteStore(Store):
    """Store in a SQLite file (WAL, synchronous=NORMAL); safe to share between threads.

    synchronous=NORMAL in WAL mode never corrupts the file, but a power cut may undo the last
    commits. Their messages were already acknowledged to the broker, so such windows show up
    as missing seqs (and later as lost) rather than vanishing unnoticed.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            _enable_wal(conn, time.monotonic() + busy_timeout_s)
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Cursor]:
        """One transaction; writers take the write lock at BEGIN so reads stay valid."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the store is closed")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn.cursor()
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- schema ---------------------------------------------------------------------------

    def migrate(self) -> int:
        while True:
            with self._tx(write=True) as c:
                c.execute(VERSION_TABLE_SQLITE)
                current = _version(c)
                todo = pending(current)
                if not todo:
                    return current
                step = todo[0]
                for statement in split_statements(step.sqlite_sql):
                    c.execute(statement)
                c.execute(
                    "INSERT INTO schema_version (version, description, applied_at) "
                    "VALUES (?, ?, ?)",
                    (step.version, step.description, time.time()),
                )

    def schema_version(self) -> int:
        with self._tx(write=False) as c:
            exists = c.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            return _version(c) if exists else 0

    # -- writing --------------------------------------------------------------------------

    def ingest(self, batch: IngestBatch, *, registration_open: bool = True) -> IngestOutcome:
        span = logic.seen_span(batch)
        with self._tx(write=True) as c:
            states: dict[str, logic.DeviceState] = {}
            registered: list[str] = []
            for device_id in sorted(span):
                row = c.execute(
                    "SELECT boot_id, status_ts, max_seq, lost FROM devices WHERE device_id = ?",
                    (device_id,),
                ).fetchone()
                if row is not None:
                    states[device_id] = logic.DeviceState(row[0], row[1], row[2], int(row[3]))
                elif registration_open:
                    lo, hi = span[device_id]
                    c.execute(
                        "INSERT INTO devices (device_id, registered_at, first_seen, last_seen) "
                        "VALUES (?, ?, ?, ?)",
                        (device_id, lo, lo, hi),
                    )
                    registered.append(device_id)
                    states[device_id] = logic.DeviceState(None, None, None, 0)
            accepted, turned_away = logic.split_unregistered(batch, states.keys())

            folds: dict[str, logic.StatusFold] = {}
            for device_id, items in logic.statuses_by_device(accepted.statuses).items():
                state = states[device_id]
                seen = {
                    r[0]
                    for r in c.execute(
                        "SELECT boot_id FROM boot_ids WHERE device_id = ?", (device_id,)
                    )
                }
                fold = logic.fold_statuses(state.status, seen, items)
                folds[device_id] = fold
                c.executemany(
                    "INSERT INTO boot_ids (device_id, boot_id, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (device_id, boot_id) DO UPDATE SET "
                    "first_seen = min(first_seen, excluded.first_seen), "
                    "last_seen = max(last_seen, excluded.last_seen)",
                    [(device_id, b, lo, hi) for b, (lo, hi) in fold.boots.items()],
                )

            inserted: set[tuple[str, int]] = set()
            for item in accepted.telemetry:
                t = item.telemetry
                c.execute(
                    "INSERT INTO telemetry (device_id, seq, received_at, window_start, "
                    "window_end, frames_processed, fps, p95_ms, power_w, payload) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (device_id, seq) DO NOTHING",
                    (
                        t.device_id,
                        t.seq,
                        item.received_at,
                        t.window_start,
                        t.window_end,
                        t.frames_processed,
                        t.fps,
                        t.latency_ms.p95,
                        t.power_w,
                        item.raw if item.raw is not None else t.model_dump_json(),
                    ),
                )
                if c.rowcount == 1:
                    inserted.add((t.device_id, t.seq))
            tallies = logic.tally_telemetry(accepted.telemetry, inserted, self.CLOCK_TOLERANCE_S)

            unlost: dict[str, int] = {}
            for device_id, tally in tallies.items():
                state = states[device_id]
                seqs = logic.lost_candidates(tally, state.lost, state.max_seq)
                if seqs:
                    unlost[device_id] = _unlose(c, device_id, seqs)

            event_inserted: set[tuple[str, int]] = set()
            for ev in accepted.events:
                e = ev.event
                c.execute(
                    "INSERT INTO events (device_id, seq, received_at, kind, payload) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING",
                    (e.device_id, e.seq, ev.received_at, e.kind, e.model_dump_json()),
                )
                if c.rowcount == 1:
                    event_inserted.add((e.device_id, e.seq))
            event_counts = logic.count_inserted(logic.event_keys(accepted.events), event_inserted)

            c.executemany(
                "INSERT INTO replies (command_id, device_id, received_at, payload) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (command_id, device_id) DO NOTHING",
                [
                    (r.reply.id, r.reply.device_id, r.received_at, r.reply.model_dump_json())
                    for r in accepted.replies
                ],
            )

            deltas = logic.device_deltas(span, states.keys(), folds, tallies, unlost)
            json_of = logic.TelemetryJson(accepted.telemetry)
            c.executemany(_UPDATE_DEVICE, [d.params(json_of) for d in deltas])
            _write_rejects(c, accepted.rejects)

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

    def register(self, device_id: str, group: str | None = None) -> None:
        with self._tx(write=True) as c:
            c.execute(
                "INSERT INTO devices (device_id, device_group, registered_at) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET "
                "device_group = coalesce(excluded.device_group, device_group)",
                (device_id, group, time.time()),
            )

    def set_group(self, device_id: str, group: str | None) -> None:
        with self._tx(write=True) as c:
            c.execute("UPDATE devices SET device_group = ? WHERE device_id = ?", (group, device_id))
            if c.rowcount == 0:
                raise KeyError(device_id)

    def log_command(self, record: CommandRecord) -> None:
        with self._tx(write=True) as c:
            c.execute(
                "INSERT INTO commands (command_id, target, name, body_json, sent_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING",
                (record.command_id, record.target, record.name, record.body_json, record.sent_at),
            )

    def declare_losses(self, now: float, grace_s: float) -> int:
        with self._tx(write=True) as c:
            gaps = [(str(d), int(a), int(b)) for d, a, b in c.execute(_GAPS, (now - grace_s,))]
            total = 0
            for device_id in sorted({g[0] for g in gaps}):
                known = [
                    (int(a), int(b))
                    for a, b in c.execute(
                        "SELECT first_seq, last_seq FROM lost_ranges WHERE device_id = ?",
                        (device_id,),
                    )
                ]
                new = [
                    piece
                    for d, a, b in gaps
                    if d == device_id
                    for piece in logic.uncovered((a, b), known)
                ]
                if not new:
                    continue
                n = sum(logic.range_size(r) for r in new)
                c.executemany(
                    "INSERT INTO lost_ranges (device_id, first_seq, last_seq, declared_at) "
                    "VALUES (?, ?, ?, ?)",
                    [(device_id, a, b, now) for a, b in new],
                )
                c.execute("UPDATE devices SET lost = lost + ? WHERE device_id = ?", (n, device_id))
                total += n
            return total

    def apply_retention(self, now: float, policy: RetentionPolicy) -> RetentionOutcome:
        raw_cutoff = now - policy.raw_days * DAY_S
        keep = now - policy.rollup_days * DAY_S
        with self._tx(write=True) as c:
            params = {"bucket": policy.bucket_s, "raw_cutoff": raw_cutoff, "keep": keep}
            rolled = int(
                c.execute(
                    "SELECT count(*) FROM telemetry WHERE received_at < :raw_cutoff "
                    "AND CAST(received_at / :bucket AS INTEGER) * :bucket >= :keep",
                    params,
                ).fetchone()[0]
            )
            c.execute(_ROLL_UP, params)
            deleted = c.execute(
                "DELETE FROM telemetry WHERE received_at < ?", (raw_cutoff,)
            ).rowcount
            rollups = c.execute("DELETE FROM rollups WHERE bucket_start < ?", (keep,)).rowcount
            events = c.execute(
                "DELETE FROM events WHERE received_at < ?", (now - policy.events_days * DAY_S,)
            ).rowcount
        return RetentionOutcome(
            windows_rolled_up=rolled,
            windows_deleted=deleted,
            rollups_deleted=rollups,
            events_deleted=events,
        )

    # -- reading --------------------------------------------------------------------------

    def devices(self, group: str | None = None) -> list[DeviceRecord]:
        with self._tx(write=False) as c:
            if group is None:
                rows = c.execute(
                    f"SELECT {logic.DEVICE_COLUMNS} FROM devices ORDER BY device_id"
                ).fetchall()
            else:
                rows = c.execute(
                    f"SELECT {logic.DEVICE_COLUMNS} FROM devices WHERE device_group = ? "
                    "ORDER BY device_id",
                    (group,),
                ).fetchall()
        return [logic.device_record(r) for r in rows]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._tx(write=False) as c:
            row = c.execute(
                f"SELECT {logic.DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else logic.device_record(row)

    def groups(self) -> dict[str, int]:
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT device_group, count(*) FROM devices WHERE device_group IS NOT NULL "
                "GROUP BY device_group ORDER BY device_group"
            ).fetchall()
        return {str(g): int(n) for g, n in rows}

    def telemetry(self, device_id: str, limit: int = 100) -> list[TelemetryRecord]:
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT device_id, seq, received_at, payload FROM telemetry "
                "WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
                (device_id, limit),
            ).fetchall()
        return [
            TelemetryRecord(str(d), int(s), float(t), Telemetry.model_validate_json(p))
            for d, s, t, p in rows
        ]

    def rollups(self, device_id: str, since: float = 0.0) -> list[RollupRecord]:
        with self._tx(write=False) as c:
            rows = c.execute(
                f"SELECT {logic.ROLLUP_COLUMNS} FROM rollups "
                "WHERE device_id = ? AND bucket_start >= ? ORDER BY bucket_start",
                (device_id, since),
            ).fetchall()
        return [logic.rollup_from_row(r) for r in rows]

    def events(self, device_id: str | None = None, limit: int = 100) -> list[EventRecord]:
        with self._tx(write=False) as c:
            if device_id is None:
                rows = c.execute(
                    "SELECT device_id, seq, received_at, payload FROM events "
                    "ORDER BY received_at DESC, device_id, seq DESC LIMIT ?",
                    (limit,),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT device_id, seq, received_at, payload FROM events "
                    "WHERE device_id = ? ORDER BY seq DESC LIMIT ?",
                    (device_id, limit),
                ).fetchall()
        return [
            EventRecord(str(d), int(s), float(t), Event.model_validate_json(p))
            for d, s, t, p in rows
        ]

    def commands(self, limit: int = 100) -> list[CommandRecord]:
        with self._tx(write=False) as c:
            rows = c.execute(
                "SELECT command_id, target, name, body_json, sent_at FROM commands "
                "ORDER BY sent_at DESC, command_id LIMIT ?",
                (limit,),
            ).fetchall()
            replies: dict[str, list[Reply]] = {}
            for row in rows:
                replies[row[0]] = [
                    Reply.model_validate_json(p)
                    for (p,) in c.execute(
                        "SELECT payload FROM replies WHERE command_id = ? ORDER BY device_id",
                        (row[0],),
                    )
                ]
        return [logic.command_record(r, replies[r[0]]) for r in rows]

    def sequence_reports(self, device_id: str | None = None) -> list[SequenceReport]:
        with self._tx(write=False) as c:
            rows = c.execute(
                f"SELECT {logic.SEQUENCE_COLUMNS} FROM devices "
                "WHERE max_seq IS NOT NULL AND (? IS NULL OR device_id = ?) ORDER BY device_id",
                (device_id, device_id),
            ).fetchall()
        return [logic.sequence_report(r) for r in rows]

    def reject_counts(self) -> dict[str, int]:
        with self._tx(write=False) as c:
            rows = c.execute("SELECT reason, n FROM reject_counts").fetchall()
        return logic.merged_counts({str(r): int(n) for r, n in rows}, get_args(RejectReason))

    def telemetry_count(self) -> int:
        with self._tx(write=False) as c:
            return int(c.execute("SELECT count(*) FROM telemetry").fetchone()[0])


def _enable_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """Switch the file to WAL, waiting out other processes doing the same.

    Changing the journal mode needs an exclusive lock and SQLite answers "database is locked"
    at once rather than through the busy handler when two processes open a new file together.
    """
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        # An in-memory database stays "memory"; anything else must be WAL.
        if mode not in ("wal", "memory"):
            raise sqlite3.OperationalError(f"could not switch to WAL, journal_mode is {mode}")
        return


def _version(c: sqlite3.Cursor) -> int:
    return int(c.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])


def _unlose(c: sqlite3.Cursor, device_id: str, seqs: Sequence[int]) -> int:
    """Take arrived seqs out of the device's lost ranges; return how many were lost."""
    ranges = c.execute(
        "SELECT first_seq, last_seq, declared_at FROM lost_ranges "
        "WHERE device_id = ? AND last_seq >= ? AND first_seq <= ?",
        (device_id, min(seqs), max(seqs)),
    ).fetchall()
    total = 0
    for first, last, declared_at in ranges:
        pieces, removed = logic.remove_seqs([(int(first), int(last))], seqs)
        if not removed:
            continue
        total += removed
        c.execute(
            "DELETE FROM lost_ranges WHERE device_id = ? AND first_seq = ?", (device_id, first)
        )
        c.executemany(
            "INSERT INTO lost_ranges (device_id, first_seq, last_seq, declared_at) "
            "VALUES (?, ?, ?, ?)",
            [(device_id, a, b, declared_at) for a, b in pieces],
        )
    return total


def _write_rejects(c: sqlite3.Cursor, rejects: Sequence[Reject]) -> None:
    if not rejects:
        return
    c.executemany(
        "INSERT INTO rejects (received_at, topic, device_id, reason, detail) "
        "VALUES (?, ?, ?, ?, ?)",
        [(r.received_at, r.topic, r.device_id, r.reason, r.detail) for r in rejects],
    )
    c.executemany(
        "INSERT INTO reject_counts (reason, n) VALUES (?, ?) "
        "ON CONFLICT (reason) DO UPDATE SET n = n + excluded.n",
        sorted(logic.reject_tally(rejects).items()),
    )
    # The newest rows have the highest ids; the subquery is NULL while under the cap.
    c.execute(
        "DELETE FROM rejects WHERE id <= "
        "(SELECT id FROM rejects ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (logic.MAX_REJECT_ROWS,),
    )
