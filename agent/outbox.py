"""A persistent, bounded, strictly ordered outbox of MQTT messages on SQLite."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeVar

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024

# Eviction order when full, lowest first. Results are QoS 0 and superseded by the next one;
# telemetry windows are periodic and every dropped one is covered by the overflow count they
# report; a retained status is replaced by the birth message on reconnect; replies answer a
# waiting operator; events (install, rollback, errors) are rare and say what changed.
PRIORITY: Final[Mapping[str, int]] = MappingProxyType(
    {"results": 0, "telemetry": 1, "status": 2, "reply": 3, "events": 4}
)
_EVICTION_ORDER: Final = sorted(PRIORITY, key=PRIORITY.__getitem__)

Synchronous = Literal["NORMAL", "FULL"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL, created REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind_id ON outbox (kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = "id, topic, payload, qos, retain, kind, created"
_CHUNK = 500  # below SQLite's oldest limit of 999 bound variables per statement
_T = TypeVar("_T")


class OutboxError(Exception):
    """The outbox database could not be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One queued message; ids grow with insertion order and are never reused."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    created: float


@dataclass(frozen=True)
class Overflow:
    """Messages dropped for a full outbox since the file was created, by kind.

    Kind "lost" counts messages that were in a corrupt file when it was moved aside.
    """

    by_kind: Mapping[str, int]

    @property
    def total(self) -> int:
        """All dropped messages of every kind."""
        return sum(self.by_kind.values())


@dataclass(frozen=True)
class Recovery:
    """An unusable database file was moved aside and a new one started."""

    path: Path
    moved_to: Path
    reason: str
    lost: int | None  # messages left in the old file; None when it could not be read
    counters_kept: bool

    def __str__(self) -> str:
        lost = "an unknown number of" if self.lost is None else str(self.lost)
        kept = "kept" if self.counters_kept else "LOST (sequence numbers restart at 0)"
        return (
            f"outbox database {self.path} was unusable ({self.reason}); moved it to "
            f"{self.moved_to} and started a new one; {lost} queued messages lost; counters {kept}"
        )


class Outbox:
    """Messages waiting for the broker, replayed in insertion order, bounded in count and bytes.

    WAL with synchronous=NORMAL: a commit is in the OS page cache once put() returns, so it
    survives the process being killed (SIGKILL, OOM); a power cut may lose the last commits
    but never corrupts the file. synchronous="FULL" fsyncs every commit and survives power
    loss too, at one fsync per put (slow on SD cards). One connection guarded by one lock:
    the inference thread puts while the network thread acks, each call takes well under a
    millisecond, and a second connection would only add SQLITE_BUSY retries. One process only.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 64 * MiB,
        synchronous: Synchronous = "NORMAL",
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(f"outbox bounds must be >= 1, got {max_messages=} {max_bytes=}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.recoveries: list[Recovery] = []
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._meta: dict[str, int] = {}  # mirror of the meta table; the lock guards both
        self._count = 0
        self._bytes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = self._open()

    def put(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        kind: str = "telemetry",
    ) -> int:
        """Queue a message and return its id; 0 if it was dropped (counted, never raised)."""
        if kind not in PRIORITY:
            raise ValueError(f"unknown outbox kind {kind!r}: expected one of {_EVICTION_ORDER}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        size = len(payload) + len(topic.encode())
        row = (topic, bytes(payload), qos, int(retain), kind, time.time(), size)
        with self._lock:
            self._require_open()
            try:
                row_id, count, size_delta, meta = self._txn(lambda c: self._insert(c, row))
            except OutboxError as exc:
                # The inference loop must go on; the count reaches disk with the next overflow.
                key = f"overflow/{kind}"
                self._meta[key] = self._meta.get(key, 0) + 1
                log.error("dropped a %s message for %s: %s", kind, topic, exc)
                return 0
            self._count += count
            self._bytes += size_delta
            self._meta.update(meta)
            return row_id

    def peek(self, limit: int = 100) -> list[Entry]:
        """The oldest `limit` entries in insertion order, without removing them."""
        sql = f"SELECT {_COLUMNS} FROM outbox ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._txn(lambda c: c.execute(sql, (max(limit, 0),)).fetchall())
        return [Entry(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered entries and return how many were there; repeated ids are harmless."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0

        def delete(c: sqlite3.Connection) -> tuple[int, int]:
            count = size = 0
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                n, b = c.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({marks})",
                    chunk,
                ).fetchone()
                c.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
                count, size = count + n, size + b
            return count, size

        with self._lock:
            count, size = self._txn(delete)
            self._count -= count
            self._bytes -= size
        return count

    def next_seq(self, stream: str) -> int:
        """The next sequence number of stream (0, 1, ...), persisted before it is returned."""
        key = f"seq/{stream}"
        with self._lock:
            value = self._meta.get(key, 0)
            self._txn(lambda c: _set_meta(c, {key: value + 1}))
            self._meta[key] = value + 1
        return value

    def counter(self, name: str) -> int:
        """A persisted counter of the caller's (0 until first raised)."""
        with self._lock:
            return self._meta.get(f"counter/{name}", 0)

    def raise_counter(self, name: str, value: int) -> None:
        """Persist counter name as value; counters only grow, so a lower value is ignored."""
        key = f"counter/{name}"
        with self._lock:
            if value <= self._meta.get(key, 0):
                return
            self._txn(lambda c: _set_meta(c, {key: value}))
            self._meta[key] = value

    # depth() and size_bytes() skip the lock: reading one int is atomic in CPython.
    def depth(self) -> int:
        """Messages waiting."""
        return self._count

    def size_bytes(self) -> int:
        """Payload and topic bytes waiting (the file adds SQLite's page overhead)."""
        return self._bytes

    def overflow(self) -> Overflow:
        """Persisted counts of messages dropped because the outbox was full."""
        with self._lock:
            by_kind = {k[9:]: v for k, v in self._meta.items() if k.startswith("overflow/")}
        return Overflow(by_kind)

    def close(self) -> None:
        """Checkpoint and close the database; later calls raise OutboxError."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals; the lock is held -----------------------------------------------------------

    def _insert(
        self, c: sqlite3.Connection, row: tuple[Any, ...]
    ) -> tuple[int, int, int, dict[str, int]]:
        """Evict as the policy says and insert row; (id, count delta, bytes delta, meta)."""
        kind, size = row[4], row[6]
        victims = self._victims(c, kind, size)
        if victims is None:  # only higher-priority messages left to evict: drop the new one
            meta = {f"overflow/{kind}": self._meta.get(f"overflow/{kind}", 0) + 1}
            _set_meta(c, meta)
            return 0, 0, 0, meta
        meta = {}
        for _, victim_kind, _ in victims:
            key = f"overflow/{victim_kind}"
            meta[key] = meta.get(key, self._meta.get(key, 0)) + 1
        c.executemany("DELETE FROM outbox WHERE id = ?", [(v[0],) for v in victims])
        _set_meta(c, meta)
        cur = c.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, kind, created, size)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            row,
        )
        freed = sum(v[2] for v in victims)
        return int(cur.lastrowid or 0), 1 - len(victims), size - freed, meta

    def _victims(
        self, c: sqlite3.Connection, kind: str, size: int
    ) -> list[tuple[int, str, int]] | None:
        """Oldest entries of the lowest kinds (up to kind) that make room, or None if none can."""
        need_n = self._count + 1 - self.max_messages
        need_b = self._bytes + size - self.max_bytes
        if size > self.max_bytes:
            return None
        victims: list[tuple[int, str, int]] = []
        for victim_kind in _EVICTION_ORDER:
            if need_n <= 0 and need_b <= 0:
                return victims
            if PRIORITY[victim_kind] > PRIORITY[kind]:
                break
            sql = "SELECT id, size FROM outbox WHERE kind = ? ORDER BY id"
            for row_id, row_size in c.execute(sql, (victim_kind,)):
                victims.append((row_id, victim_kind, row_size))
                need_n, need_b = need_n - 1, need_b - row_size
                if need_n <= 0 and need_b <= 0:
                    return victims
        return victims if need_n <= 0 and need_b <= 0 else None

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self.path} is closed or could not be reopened")
        return self._conn

    def _txn(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run body in one transaction; a file found corrupt is replaced once and body rerun."""
        for attempt in (1, 2):
            conn = self._require_open()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):  # keep the original error
                        conn.execute("ROLLBACK")
                    raise
                return result
            except sqlite3.Error as exc:
                if attempt == 2 or not _is_corrupt(exc):
                    raise OutboxError(f"outbox {self.path}: {exc}") from exc
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
                self._conn = None  # stays None if no new file can be made
                self._conn = self._replace(str(exc), lost=self._count)
        raise AssertionError("unreachable")

    def _open(self) -> sqlite3.Connection:
        """Open or create the database; an unusable file is moved aside and replaced."""
        try:
            return self._connect()
        except sqlite3.Error as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise OutboxError(f"outbox {self.path} is in use by another process") from exc
            return self._replace(str(exc), lost=None)

    def _replace(self, reason: str, lost: int | None) -> sqlite3.Connection:
        """Move the database aside, keep what counters it still has, and start a new one."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside, n = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}"), n + 1
        try:
            # The -wal and -shm files go too: a stale WAL must never be replayed into a new file.
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.replace(f"{aside}{suffix}")
        except OSError as exc:
            raise OutboxError(f"outbox {self.path} is unusable ({reason}) and {exc}") from exc
        if lost is None:  # at start-up: whatever the old file still holds
            lost, counters_kept = _salvage(aside, self._meta)
        else:  # while running: the counters are in memory
            counters_kept = True
        if lost:
            self._meta["overflow/lost"] = self._meta.get("overflow/lost", 0) + lost
        recovery = Recovery(self.path, aside, reason, lost, counters_kept)
        self.recoveries.append(recovery)
        log.error("%s", recovery)
        try:
            return self._connect()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: cannot create a new database: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        """Connect, check the file, create the schema and load counters and totals."""
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in _txn).
        conn = sqlite3.connect(
            self.path, timeout=1.0, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA journal_size_limit={4 * MiB}")  # shrink the WAL after a burst
            # quick_check(1): the first problem is enough, and its report is one line.
            check = str(conn.execute("PRAGMA quick_check(1)").fetchone()[0])
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {' '.join(check.split())}")
            conn.executescript(_SCHEMA)
            stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            # Counters only grow, so the larger of the cached and stored value is the true one.
            merged = {
                k: max(self._meta.get(k, 0), stored.get(k, 0)) for k in {*self._meta, *stored}
            }
            conn.execute("BEGIN IMMEDIATE")
            _set_meta(conn, merged)
            conn.execute("COMMIT")
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        self._meta, self._count, self._bytes = merged, count, size
        return conn


def _is_corrupt(exc: sqlite3.Error) -> bool:
    """Whether a new file would fix exc; a full disk or an I/O error would not."""
    # Plain DatabaseError is SQLITE_CORRUPT or SQLITE_NOTADB; garbage inside a TEXT column
    # surfaces as an OperationalError from Python's decoder instead.
    return type(exc) is sqlite3.DatabaseError or str(exc).startswith("Could not decode")


def _set_meta(c: sqlite3.Connection, values: Mapping[str, int]) -> None:
    c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", values.items())


def _salvage(aside: Path, meta: dict[str, int]) -> tuple[int | None, bool]:
    """Best effort: merge the counters of a moved-aside file into meta; (queued, counters read)."""
    lost: int | None = None
    read = False
    try:
        conn = sqlite3.connect(f"{aside.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None, False
    try:
        for key, value in conn.execute("SELECT key, value FROM meta"):
            meta[key] = max(meta.get(key, 0), int(value))
        read = True
        lost = int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    except (sqlite3.Error, TypeError, ValueError):
        pass
    finally:
        conn.close()
    return lost, read


def drain(outbox: Outbox, publish: Callable[[Entry], bool], batch: int = 100) -> int:
    """Publish queued entries in order and ack those accepted; stop at the first refusal."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    sent = 0
    while True:
        entries = outbox.peek(batch)
        accepted: list[int] = []
        try:
            for entry in entries:
                if not publish(entry):
                    break
                accepted.append(entry.id)
        finally:
            # Ack what went out even when publish raised, so it is not sent twice.
            outbox.ack(accepted)
        sent += len(accepted)
        if not entries or len(accepted) < len(entries):
            return sent
