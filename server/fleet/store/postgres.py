"""The store in PostgreSQL, shared by several coordinator processes.

Each store object holds one connection guarded by a lock. Correctness across processes comes
from the database, never from this process:
- telemetry and events are inserted with ON CONFLICT (device_id, seq) DO NOTHING RETURNING,
  so exactly one writer stores a (device, seq) and every other counts it as a duplicate;
- an ingest locks the rows of its devices (SELECT ... FOR UPDATE, in device id order, so two
  batches sharing devices queue instead of deadlocking) before it reads the status to compare
  with, the boot ids seen and the lost ranges, and writes counters as x = x + n;
- migrations, loss declaration and retention hold transaction-scoped advisory locks;
- retention moves raw windows with DELETE ... RETURNING inside the statement that adds them
  to the rollups, so a window another coordinator already moved is not added twice.
Batches go as arrays through unnest(): one statement per table whatever the batch size.
The arrays are sent in binary (%b): in text form psycopg escapes every JSON payload with a
regex, which made a 500-message batch about four times slower.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from functools import cache, lru_cache
from typing import TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import TupleRow

from edgefleet.server.fleet.store.errors import (
    DATA_CONVERSION_ERRORS,
    StoreError,
    refused,
    unavailable,
)
from edgefleet.server.fleet.store.schema import VERSION_TABLE_POSTGRES, Migration
from edgefleet.server.fleet.store.sql import Lock, Row, Sql, Table
from edgefleet.server.fleet.store.sqlstore import SqlStore

_T = TypeVar("_T")
Cursor = psycopg.Cursor[TupleRow]

# Ordered locking makes deadlocks unexpected; a retry keeps a surprise from losing a batch.
_RETRIES = 3

_UPDATE_DEVICES = """
UPDATE devices AS d SET
    first_seen = LEAST(d.first_seen, u.first_seen),
    last_seen = GREATEST(d.last_seen, u.last_seen),
    online = COALESCE(u.online, d.online),
    status_json = COALESCE(u.status_json, d.status_json),
    status_ts = CASE WHEN u.status_json IS NULL THEN d.status_ts ELSE u.status_ts END,
    status_received_at = CASE WHEN u.status_json IS NULL THEN d.status_received_at
                              ELSE u.status_received_at END,
    boot_id = COALESCE(u.boot_id, d.boot_id),
    device_group = COALESCE(u.device_group, d.device_group),
    id_conflicts = d.id_conflicts + u.id_conflicts,
    first_seq = LEAST(d.first_seq, u.first_seq),
    max_seq = GREATEST(d.max_seq, u.max_seq),
    received = d.received + u.received,
    duplicates = d.duplicates + u.duplicates,
    lost = d.lost - u.unlost,
    dropped = d.dropped - u.undropped,
    reported_overflow = GREATEST(d.reported_overflow, u.overflow),
    last_telemetry_json = CASE
        WHEN u.newest_seq IS NOT NULL
             AND (d.last_telemetry_seq IS NULL OR u.newest_seq > d.last_telemetry_seq)
        THEN u.newest_json ELSE d.last_telemetry_json END,
    last_telemetry_seq = GREATEST(d.last_telemetry_seq, u.newest_seq)
FROM unnest(
    %(device_id)b::text[], %(first_seen)b::float8[], %(last_seen)b::float8[],
    %(online)b::bool[], %(status_json)b::text[], %(status_ts)b::float8[],
    %(status_received_at)b::float8[],
    %(boot_id)b::text[], %(device_group)b::text[], %(id_conflicts)b::int8[],
    %(first_seq)b::int8[], %(max_seq)b::int8[], %(received)b::int8[],
    %(duplicates)b::int8[], %(unlost)b::int8[], %(undropped)b::int8[], %(overflow)b::int8[],
    %(newest_seq)b::int8[], %(newest_json)b::text[]
) AS u(device_id, first_seen, last_seen, online, status_json, status_ts, status_received_at,
       boot_id,
       device_group, id_conflicts, first_seq, max_seq, received, duplicates, unlost,
       undropped, overflow, newest_seq, newest_json)
WHERE d.device_id = u.device_id
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


class PostgresSql(Sql):
    """One PostgreSQL transaction: batches as binary arrays, one statement per table."""

    IN_LIST = "= ANY(?)"
    FOR_UPDATE = " FOR UPDATE"
    LEAST = "LEAST"
    GREATEST = "GREATEST"
    VERSION_TABLE = VERSION_TABLE_POSTGRES

    def __init__(self, cur: Cursor) -> None:
        self._cur = cur

    def rows(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        return self._execute(query, params).fetchall()

    def run(self, query: str, params: Sequence[object] = ()) -> int:
        return self._execute(query, params).rowcount

    def many(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            self._cur.executemany(_placeholders(query), rows)

    def as_list(self, values: Sequence[object]) -> object:
        return list(values)

    def insert(self, table: Table, rows: Sequence[Sequence[object]], conflict: str = "") -> None:
        if rows:
            self._cur.execute(f"{_unnest_insert(table)} {conflict}", _columns(rows, table))

    def insert_new(self, table: Table, rows: Sequence[Sequence[object]]) -> list[Row]:
        if not rows:
            return []
        return self._cur.execute(_unnest_insert_new(table), _columns(rows, table)).fetchall()

    def update_devices(self, deltas: Sequence[Mapping[str, object]]) -> None:
        if deltas:
            self._cur.execute(_UPDATE_DEVICES, {k: [d[k] for d in deltas] for k in deltas[0]})

    def lock(self, key: Lock) -> None:
        self._cur.execute("SELECT pg_advisory_xact_lock(%s)", (int(key),))

    def roll_up(self, raw_cutoff: float, bucket_s: float, keep: float) -> tuple[int, int]:
        row = self._cur.execute(
            _ROLL_UP, {"raw_cutoff": raw_cutoff, "bucket": bucket_s, "keep": keep}
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def run_script(self, migration: Migration) -> None:
        # Without parameters psycopg sends the script as one simple query: many statements.
        self._cur.execute(migration.postgres_sql)

    def table_exists(self, name: str) -> bool:
        return bool(self.one("SELECT to_regclass(?) IS NOT NULL", (name,))[0])

    def _execute(self, query: str, params: Sequence[object]) -> Cursor:
        # No parameters: the text is sent as it is (no placeholders, no '%' escapes).
        if not params:
            return self._cur.execute(query)
        return self._cur.execute(_placeholders(query), params)


@lru_cache(maxsize=256)
def _placeholders(query: str) -> str:
    """The shared SQL's '?' placeholders as psycopg's '%s'."""
    return query.replace("%", "%%").replace("?", "%s")


@cache
def _unnest_insert(table: Table) -> str:
    arrays = ", ".join(f"%b::{t}[]" for t in table.types)
    return f"INSERT INTO {table.name} ({', '.join(table.columns)}) SELECT * FROM unnest({arrays})"


@cache
def _unnest_insert_new(table: Table) -> str:
    key = ", ".join(table.key)
    return f"{_unnest_insert(table)} ON CONFLICT ({key}) DO NOTHING RETURNING {key}"


def _columns(rows: Sequence[Sequence[object]], table: Table) -> list[list[object]]:
    """Rows to one list per column, the shape unnest() takes."""
    return [[row[i] for row in rows] for i in range(len(table.columns))]


class PostgresStore(SqlStore):
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

    def _connect(self) -> psycopg.Connection[TupleRow]:
        # autocommit: each call opens its own transaction block with conn.transaction().
        return psycopg.connect(self.dsn, autocommit=True, connect_timeout=self._connect_timeout_s)

    def _run(self, body: Callable[[Sql], _T], *, write: bool) -> _T:
        """Run body in one transaction; errors come out classified (see errors.py)."""
        try:
            return self._attempts(body)
        except Exception as exc:
            classified = classify(exc)
            if classified is None:
                raise
            raise classified from exc

    def _attempts(self, body: Callable[[Sql], _T]) -> _T:
        """Run body in one transaction, again after a deadlock or serialization failure."""
        with self._lock:
            for attempt in range(_RETRIES):
                if self._closed:
                    raise RuntimeError("the store is closed")
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = self._connect()
                try:
                    with self._conn.transaction(), self._conn.cursor() as cur:
                        return body(PostgresSql(cur))
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


# SQLSTATE classes about the values of this transaction: 22 data exception (numeric value out
# of range, NUL in text, invalid encoding), 23 integrity constraint, 54 program limit exceeded
# (a value too large for an index row).
_DATA_CLASSES = ("22", "23", "54")


def classify(exc: Exception) -> StoreError | None:
    """Transient or permanent, for an error raised inside a transaction; None: not ours."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            # Raised by psycopg itself: adapting a value of this batch failed (DataError,
            # ProgrammingError "cannot adapt"), or the connection is gone (Operational,
            # Interface).
            if isinstance(exc, (psycopg.DataError, psycopg.ProgrammingError)):
                return refused(exc)
            return unavailable(exc)
        if state[:2] in _DATA_CLASSES:
            return refused(exc)
        # Connection (08), resources (53), shutdown (57), deadlock after retries (40), and a
        # schema that needs an operator (42): the data is fine, keep it and retry.
        return unavailable(exc)
    if isinstance(exc, DATA_CONVERSION_ERRORS):
        return refused(exc)
    return None
