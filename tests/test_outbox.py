"""The on-disk outbox: order, bounds, counters, durability under SIGKILL, corruption, threads."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefleet.agent.outbox import Entry, Outbox, OutboxError, drain

REPO = Path(__file__).resolve().parents[1]
TOPIC = "edgefleet/v1/dev/pi-1/telemetry"
EVENTS = "edgefleet/v1/dev/pi-1/events"


def payloads(entries: list[Entry]) -> list[bytes]:
    return [e.payload for e in entries]


def numbered(n: int, start: int = 0) -> list[bytes]:
    return [f"m{i:06d}".encode() for i in range(start, start + n)]


def test_order_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db) as box:
        ids = [box.put(TOPIC, p) for p in numbered(1000)]
        assert ids == sorted(ids) and len(set(ids)) == 1000
    with Outbox(db) as box:
        entries = box.peek(5000)
        assert payloads(entries) == numbered(1000)
        assert [e.id for e in entries] == ids
        assert entries[0].topic == TOPIC and entries[0].qos == 1 and not entries[0].retain
        assert box.depth() == 1000
        # Ids keep growing after a restart even once everything was acked (AUTOINCREMENT).
        box.ack(ids)
        assert box.put(TOPIC, b"after") > ids[-1]


def test_entry_fields_round_trip(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.put("a/status", b"\x00\xff", qos=0, retain=True, kind="status")
        (entry,) = box.peek(10)
    assert (entry.topic, entry.payload, entry.qos, entry.retain, entry.kind) == (
        "a/status",
        b"\x00\xff",
        0,
        True,
        "status",
    )
    assert abs(entry.created - time.time()) < 60


def test_sequence_numbers_persist_and_never_repeat(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db) as box:
        assert [box.next_seq("telemetry") for _ in range(3)] == [0, 1, 2]
        assert box.next_seq("events") == 0
    with Outbox(db) as box:
        assert box.next_seq("telemetry") == 3
        assert box.next_seq("events") == 1
        seen = [box.next_seq("telemetry") for _ in range(100)]
    with Outbox(db) as box:
        assert box.next_seq("telemetry") == seen[-1] + 1


def test_bounded_count_evicts_oldest_telemetry_keeps_events(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db, max_messages=10) as box:
        for i in range(5):
            box.put(EVENTS, f"e{i}".encode(), kind="events")
        for i in range(20):
            assert box.put(TOPIC, f"t{i}".encode()) > 0
        assert box.depth() == 10
        kept = payloads(box.peek(100))
        # Replay stays in insertion order: events first (they were put first), then telemetry.
        assert kept == [f"e{i}".encode() for i in range(5)] + [
            f"t{i}".encode() for i in range(15, 20)
        ]
        assert box.overflow().by_kind == {"telemetry": 15}
    with Outbox(db, max_messages=10) as box:
        assert box.overflow().total == 15
        assert box.depth() == 10


def test_full_of_events_drops_new_telemetry_and_oldest_event(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=3) as box:
        for i in range(3):
            box.put(EVENTS, f"e{i}".encode(), kind="events")
        # Nothing of lower priority to evict: the new telemetry itself is dropped and counted.
        assert box.put(TOPIC, b"t") == 0
        assert box.overflow().by_kind == {"telemetry": 1}
        # An event makes room by evicting the oldest event, never more than one.
        assert box.put(EVENTS, b"e3", kind="events") > 0
        assert payloads(box.peek(10)) == [b"e1", b"e2", b"e3"]
        assert box.overflow().by_kind == {"telemetry": 1, "events": 1}
        assert box.overflow().total == 2


def test_results_are_evicted_before_telemetry(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=3) as box:
        box.put(TOPIC, b"t0")
        box.put("r", b"r0", qos=0, kind="results")
        box.put(TOPIC, b"t1")
        box.put(TOPIC, b"t2")
        assert payloads(box.peek(10)) == [b"t0", b"t1", b"t2"]
        assert box.overflow().by_kind == {"results": 1}


def test_bounded_bytes(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    with Outbox(db, max_bytes=1000) as box:
        for i in range(20):
            box.put("t", bytes([i]) * 99)  # 99 payload + 1 topic byte = 100 each
        assert box.size_bytes() == 1000
        assert box.depth() == 10
        assert [e.payload[0] for e in box.peek(100)] == list(range(10, 20))
        assert box.overflow().by_kind == {"telemetry": 10}
        # A bigger message evicts exactly as many old ones as it needs.
        box.put("t", b"x" * 249)
        assert box.depth() == 8 and box.size_bytes() == 950
        # A message that cannot fit even in an empty outbox is dropped and counted.
        assert box.put("t", b"y" * 2000) == 0
        assert box.overflow().total == 14
        assert box.depth() == 8
    with Outbox(db, max_bytes=1000) as box:
        assert box.size_bytes() == 950 and box.overflow().total == 14


def test_ack_is_idempotent(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        ids = [box.put(TOPIC, p) for p in numbered(10)]
        assert box.ack(ids[:3]) == 3
        assert box.ack(ids[:3]) == 0
        assert box.ack([ids[3], ids[3], 999_999]) == 1
        assert box.ack([]) == 0
        assert box.depth() == 6
        assert box.size_bytes() == sum(len(TOPIC) + len(p) for p in numbered(10)[4:])
        assert payloads(box.peek(100)) == numbered(10)[4:]


def test_ack_many_ids(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        ids = [box.put(TOPIC, p) for p in numbered(2500)]
        assert box.ack(ids) == 2500
        assert box.depth() == 0 and box.size_bytes() == 0


def test_drain_stops_at_first_failure_and_resumes_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for p in numbered(250):
            box.put(TOPIC, p)
        sent: list[bytes] = []
        failed = False

        def flaky(entry: Entry) -> bool:
            nonlocal failed
            if len(sent) == 130 and not failed:  # the broker refuses once, mid-batch
                failed = True
                return False
            sent.append(entry.payload)
            return True

        assert drain(box, flaky, batch=50) == 130
        assert box.depth() == 120
        assert payloads(box.peek(1)) == [numbered(250)[130]]
        assert drain(box, flaky, batch=50) == 120
        assert sent == numbered(250)
        assert box.depth() == 0
        assert drain(box, flaky) == 0


def test_drain_acks_accepted_entries_when_publish_raises(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for p in numbered(5):
            box.put(TOPIC, p)

        def boom(entry: Entry) -> bool:
            if entry.payload == numbered(5)[2]:
                raise RuntimeError("network thread died")
            return True

        with pytest.raises(RuntimeError):
            drain(box, boom)
        assert payloads(box.peek(10)) == numbered(5)[2:]


_CHILD = """
import sys, time
from edgefleet.agent.outbox import Outbox
box = Outbox(sys.argv[1])
for i in range(int(sys.argv[2])):
    box.put("t", f"m{i:06d}".encode())
print(box.next_seq("telemetry"), flush=True)
print("done", flush=True)
time.sleep(120)  # idle with the database open until the test kills us
"""


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_sigkill_loses_nothing_committed(tmp_path: Path, synchronous: str) -> None:
    db = tmp_path / "outbox.db"
    n = 500
    script = _CHILD.replace(
        "Outbox(sys.argv[1])", f"Outbox(sys.argv[1], synchronous={synchronous!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(db), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "0"
        assert child.stdout.readline().strip() == "done"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert Path(f"{db}-wal").exists()  # killed: no checkpoint on close happened
    with Outbox(db) as box:
        assert payloads(box.peek(n + 10)) == numbered(n)
        assert box.next_seq("telemetry") == 1


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "outbox.db"
    garbage = b"this is not an sqlite database\x00" * 200
    db.write_bytes(garbage)
    with caplog.at_level(logging.ERROR, logger="edgefleet.agent.outbox"), Outbox(db) as box:
        (recovery,) = box.recoveries
        assert recovery.path == db
        assert recovery.moved_to.name.startswith("outbox.db.corrupt-")
        assert recovery.moved_to.read_bytes() == garbage
        assert str(db) in str(recovery) and str(recovery.moved_to) in str(recovery)
        assert not recovery.counters_kept and recovery.lost is None
        assert str(db) in caplog.text
        # The new outbox works.
        box.put(TOPIC, b"fresh")
        assert payloads(box.peek(10)) == [b"fresh"]
    with Outbox(db) as box:
        assert box.recoveries == []
        assert payloads(box.peek(10)) == [b"fresh"]


def test_damaged_file_keeps_readable_counters(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db) as box:
        for _ in range(7):
            box.next_seq("telemetry")
        for p in numbered(3000):
            box.put(TOPIC, p)
    # Wreck the outbox table's pages but leave page 1 (schema) alone.
    with db.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        f.write(b"\xa5" * 8192)
    with Outbox(db) as box:
        (recovery,) = box.recoveries
        assert recovery.moved_to.exists()
        assert recovery.reason.startswith("quick_check: ")
        assert "\n" not in recovery.reason
        assert box.depth() == 0
        # The meta table's page is intact, so sequence numbers go on where they were.
        assert recovery.counters_kept
        assert box.next_seq("telemetry") == 7


def test_a_locked_file_is_refused_not_moved_aside(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with Outbox(db) as box:
        box.put(TOPIC, b"x")
    # A file locked by another process is never moved aside.
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(OutboxError, match="in use"):
            Outbox(db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_closed_outbox_raises(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        box.put(TOPIC, b"x")
    with pytest.raises(OutboxError, match="closed"):
        box.peek()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bounds"):
        Outbox(tmp_path / "o.db", max_messages=0)
    with Outbox(tmp_path / "o.db") as box, pytest.raises(ValueError, match="unknown outbox kind"):
        box.put(TOPIC, b"x", kind="cmd")


def test_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    Outbox(db).close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_one_thread_puts_another_drains(tmp_path: Path) -> None:
    n = 3000
    received: list[bytes] = []
    done = threading.Event()
    calls = 0

    def publish(entry: Entry) -> bool:
        nonlocal calls
        calls += 1
        if calls % 97 == 0:  # a broker hiccup now and then
            return False
        received.append(entry.payload)
        return True

    with Outbox(tmp_path / "o.db") as box:

        def produce() -> None:
            for p in numbered(n):
                box.put(TOPIC, p)
            done.set()

        producer = threading.Thread(target=produce)
        producer.start()
        deadline = time.monotonic() + 60
        while not (done.is_set() and box.depth() == 0):
            drain(box, publish, batch=64)
            assert time.monotonic() < deadline
        producer.join()
        assert received == numbered(n)
        assert box.overflow().total == 0


def test_corruption_found_while_running_is_recovered(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    box = Outbox(db)
    try:
        seqs = [box.next_seq("telemetry") for _ in range(5)]
        for i in range(2000):  # 16 MiB: far more than SQLite's page cache holds
            box.put(TOPIC, bytes([i % 251]) * 8192)
        # Move everything from the WAL into the main file, then damage it behind SQLite's back.
        assert box._conn is not None
        box._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with db.open("r+b") as f:
            size = f.seek(0, os.SEEK_END)
            for offset in range(size // 4, size, size // 8):
                f.seek(offset)
                f.write(b"\xa5" * 65536)
        assert box.peek(5000) == []  # the read hit the damage; a new file replaced it
        (recovery,) = box.recoveries
        assert recovery.lost == 2000 and recovery.counters_kept
        assert box.overflow().by_kind == {"lost": 2000}
        assert box.next_seq("telemetry") == seqs[-1] + 1
        box.put(TOPIC, b"fresh")
        assert payloads(box.peek(10)) == [b"fresh"]
    finally:
        box.close()
    with Outbox(db) as box:
        assert box.overflow().total == 2000 and box.depth() == 1
