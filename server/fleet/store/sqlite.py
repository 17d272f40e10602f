"""The store in one SQLite file: a single coordinator, or a few on one host.

One connection serves every thread, guarded by a lock; writers take the database write lock
up front (BEGIN IMMEDIATE), so a read-decide-write inside a transaction cannot interleave
with another process's writes, and no row or advisory lock is needed. WAL lets readers in
other processes go on meanwhile.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TypeVar

from edgefleet.server.fleet.store.errors import (
    DATA_CONVERSION_ERRORS,
    StoreError,
    refused,
    unavailable,
)
from edgefleet.server.fleet.store.schema import (
    VERSION_TABLE_SQLITE,
    Migration,
    split_statements,
)
from edgefleet.server.fleet.store.sql import Lock, Row, Sql, Table
from edgefleet.server.fleet.store.sqlstore import SqlStore

_T = TypeVar("_T")

_UPDATE_DEVICE = """
UPDATE devices SET
    first_seen = min(coalesce(first_seen, :first_seen), :first_seen),
    last_seen = max(coalesce(last_seen, :last_seen), :last_seen),
    online = coalesce(:online, online),
    status_json = coalesce(:status_json, status_json),
    status_ts = CASE WHEN :status_json IS NULL THEN status_ts ELSE :status_ts END,
    status_received_at = CASE WHEN :status_json IS NULL THEN status_received_at
                              ELSE :status_received_at END,
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
    dropped = dropped - :undropped,
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

# CAST truncates, which is floor for the non-negative times the protocol allows.
_IN_ROLLUP = (
    "received_at < :raw_cutoff AND CAST(received_at / :bucket AS INTEGER) * :bucket >= :keep"
)
_ROLL_UP = f"""
INSERT INTO rollups (device_id, bucket_start, windows, frames_processed, fps_sum, p95_max,
                     power_sum, power_n, energy_j)
SELECT device_id, CAST(received_at / :bucket AS INTEGER) * :bucket AS b, count(*),
       sum(frames_processed), sum(fps), max(p95_ms), coalesce(sum(power_w), 0.0),
       count(power_w), coalesce(sum(power_w * (window_end - window_start)), 0.0)
FROM telemetry
WHERE {_IN_ROLLUP}
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


class SqliteSql(Sql):
    """One SQLite transaction: plain executemany for batches (no network round trips)."""

    # A list travels as one JSON text: no limit on the number of host parameters.
    IN_LIST = "IN (SELECT value FROM json_each(?))"
    FOR_UPDATE = ""
    LEAST = "min"
    GREATEST = "max"
    VERSION_TABLE = VERSION_TABLE_SQLITE

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self._cur = cur

    def rows(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        return self._cur.execute(query, params).fetchall()

    def run(self, query: str, params: Sequence[object] = ()) -> int:
        return self._cur.execute(query, params).rowcount

    def many(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        self._cur.executemany(query, rows)

    def as_list(self, values: Sequence[object]) -> object:
        return json.dumps(list(values))

    def insert(self, table: Table, rows: Sequence[Sequence[object]], conflict: str = "") -> None:
        if rows:
            self._cur.executemany(f"{_insert_sql(table)} {conflict}", rows)

    def insert_new(self, table: Table, rows: Sequence[Sequence[object]]) -> list[Row]:
        # executemany cannot say which rows were inserted; one statement per row is cheap
        # in-process and its rowcount says it.
        query = _insert_new_sql(table)
        width = len(table.key)
        cur = self._cur
        inserted: list[Row] = []
        for row in rows:
            if cur.execute(query, row).rowcount == 1:
                inserted.append(tuple(row[:width]))
        return inserted

    def update_devices(self, deltas: Sequence[Mapping[str, object]]) -> None:
        self._cur.executemany(_UPDATE_DEVICE, deltas)

    def lock(self, key: Lock) -> None:
        """Nothing to do: a writer holds the whole database's write lock (BEGIN IMMEDIATE)."""

    def roll_up(self, raw_cutoff: float, bucket_s: float, keep: float) -> tuple[int, int]:
        params = {"bucket": bucket_s, "raw_cutoff": raw_cutoff, "keep": keep}
        rolled = self._cur.execute(
            f"SELECT count(*) FROM telemetry WHERE {_IN_ROLLUP}", params
        ).fetchone()[0]
        self._cur.execute(_ROLL_UP, params)
        deleted = self.run("DELETE FROM telemetry WHERE received_at < ?", (raw_cutoff,))
        return deleted, int(rolled)

    def run_script(self, migration: Migration) -> None:
        # executescript() would commit the open transaction: statements one by one instead.
        for statement in split_statements(migration.sqlite_sql):
            self._cur.execute(statement)

    def table_exists(self, name: str) -> bool:
        found = self.rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return bool(found)


@cache
def _insert_sql(table: Table) -> str:
    marks = ", ".join("?" * len(table.columns))
    return f"INSERT INTO {table.name} ({', '.join(table.columns)}) VALUES ({marks})"


@cache
def _insert_new_sql(table: Table) -> str:
    return f"{_insert_sql(table)} ON CONFLICT ({', '.join(table.key)}) DO NOTHING"


class SqliteStore(SqlStore):
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

    def _run(self, body: Callable[[Sql], _T], *, write: bool) -> _T:
        """One transaction; writers take the write lock at BEGIN so their reads stay valid."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the store is closed")
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = body(SqliteSql(conn.cursor()))
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except Exception as exc:
                classified = classify(exc)
                if classified is None:
                    raise
                raise classified from exc
            return result

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# SQLite's primary result codes (https://sqlite.org/rescode.html) about the values of this
# transaction: TOOBIG, CONSTRAINT, MISMATCH, RANGE. The type stubs lack the module's names.
_ERROR = 1
_DATA_CODES = frozenset({18, 19, 20, 25})


def classify(exc: Exception) -> StoreError | None:
    """Transient or permanent, for an error raised inside a transaction; None: not ours."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError)):
        return refused(exc)
    if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        # Binding a value of this batch failed (an unsupported type, a bad string).
        return refused(exc) if "closed" not in str(exc) else unavailable(exc)
    if isinstance(exc, sqlite3.DatabaseError):
        code = (getattr(exc, "sqlite_errorcode", None) or _ERROR) & 0xFF
        if code in _DATA_CODES or (code == _ERROR and "integer overflow" in str(exc)):
            return refused(exc)
        # BUSY, LOCKED, IOERR, FULL, ...: the store cannot work now. A plain SQLITE_ERROR
        # ("no such table") is the schema's problem, not the data's: keep the data too.
        return unavailable(exc)
    if isinstance(exc, DATA_CONVERSION_ERRORS):
        return refused(exc)
    return None


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
