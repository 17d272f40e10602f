"""What a backend provides inside one transaction: the few steps where SQL dialects differ.

The store's algorithms (ingest.py, losses.py, sqlstore.py) are written once against Sql.
A backend implements it over its driver's cursor:
- dialect: SQL written for every backend uses '?' placeholders and the fragments below
  (a list parameter, row locks, LEAST/GREATEST);
- batch execution: insert() and insert_new() send many rows at once, each backend in its
  fastest way (executemany in SQLite, arrays through unnest() in PostgreSQL);
- locking: lock() serializes the maintenance jobs of several coordinators;
- the statements whose SQL differs too much to share (the device update, the rollup move,
  migrations).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

from edgefleet.server.fleet.store.schema import Migration

Row = tuple[Any, ...]


class Table(NamedTuple):
    """Columns a batch insert writes; key names the leading columns that identify a row."""

    name: str
    columns: tuple[str, ...]
    types: tuple[str, ...]  # PostgreSQL element types, for rows sent as arrays
    key: tuple[str, ...] = ()


NEW_DEVICES = Table(
    "devices",
    ("device_id", "registered_at", "first_seen", "last_seen"),
    ("text", "float8", "float8", "float8"),
    key=("device_id",),
)
BOOT_IDS = Table(
    "boot_ids",
    ("device_id", "boot_id", "first_seen", "last_seen"),
    ("text", "text", "float8", "float8"),
    key=("device_id", "boot_id"),
)
TELEMETRY = Table(
    "telemetry",
    (
        "device_id",
        "seq",
        "received_at",
        "window_start",
        "window_end",
        "frames_processed",
        "fps",
        "p95_ms",
        "power_w",
        "payload",
    ),
    ("text", "int8", "float8", "float8", "float8", "int8", "float8", "float8", "float8", "text"),
    key=("device_id", "seq"),
)
EVENTS = Table(
    "events",
    ("device_id", "seq", "received_at", "kind", "payload"),
    ("text", "int8", "float8", "text", "text"),
    key=("device_id", "seq"),
)
REPLIES = Table(
    "replies",
    ("command_id", "device_id", "received_at", "payload"),
    ("text", "text", "float8", "text"),
    key=("command_id", "device_id"),
)
REJECTS = Table(
    "rejects",
    ("received_at", "topic", "device_id", "reason", "detail"),
    ("float8", "text", "text", "text", "text"),
)
REJECT_COUNTS = Table("reject_counts", ("reason", "n"), ("text", "int8"), key=("reason",))
LOST_RANGES = Table(
    "lost_ranges",
    ("device_id", "first_seq", "last_seq", "declared_at", "dropped"),
    ("text", "int8", "int8", "float8", "bool"),
    key=("device_id", "first_seq"),
)


class Lock(IntEnum):
    """Keys of transaction-scoped locks: one coordinator at a time does each of these jobs
    (the others wait, then find the work done)."""

    MIGRATE = 0x6564_6765_0001
    LOSSES = 0x6564_6765_0002
    RETENTION = 0x6564_6765_0003


class Sql(ABC):
    """One open transaction of a backend."""

    # "IN ..." taking one parameter made by as_list(): f"WHERE device_id {sql.IN_LIST}".
    IN_LIST: str
    # Appended to a SELECT whose rows the transaction goes on to change ("" where the whole
    # database is locked for writing anyway).
    FOR_UPDATE: str
    LEAST: str
    GREATEST: str
    VERSION_TABLE: str  # the schema_version table, created outside the migrations

    @abstractmethod
    def rows(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        """Run one statement and return all its rows."""

    def one(self, query: str, params: Sequence[object] = ()) -> Row:
        """The single row a query returns."""
        rows = self.rows(query, params)
        if len(rows) != 1:
            raise RuntimeError(f"expected one row, got {len(rows)}: {query.strip()[:80]}")
        return rows[0]

    @abstractmethod
    def run(self, query: str, params: Sequence[object] = ()) -> int:
        """Run one statement; return how many rows it changed."""

    @abstractmethod
    def many(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        """Run one statement per row (for the few rows of maintenance jobs)."""

    @abstractmethod
    def as_list(self, values: Sequence[object]) -> object:
        """The parameter IN_LIST takes for these values."""

    @abstractmethod
    def insert(self, table: Table, rows: Sequence[Sequence[object]], conflict: str = "") -> None:
        """Insert rows (in order) with an optional ON CONFLICT clause."""

    @abstractmethod
    def insert_new(self, table: Table, rows: Sequence[Sequence[object]]) -> list[Row]:
        """Insert the rows whose key is not stored yet; return the keys of those inserted.

        A key repeated within rows is inserted once. Concurrent writers of one key: exactly
        one of them gets it back.
        """

    @abstractmethod
    def update_devices(self, deltas: Sequence[Mapping[str, object]]) -> None:
        """Apply DeviceDelta.params() to their device rows (counters add, bounds merge)."""

    @abstractmethod
    def lock(self, key: Lock) -> None:
        """Hold a lock on key until the transaction ends."""

    @abstractmethod
    def roll_up(self, raw_cutoff: float, bucket_s: float, keep: float) -> tuple[int, int]:
        """Move raw windows received before raw_cutoff into rollups of buckets from keep on.

        Returns (windows deleted, windows added to rollups): windows in buckets older than
        keep are deleted without rollup.
        """

    @abstractmethod
    def run_script(self, migration: Migration) -> None:
        """Run a migration's statements for this dialect."""

    @abstractmethod
    def table_exists(self, name: str) -> bool: ...
