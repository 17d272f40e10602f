"""Ingest speed, and several coordinator processes writing one store."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import psycopg

from edgefleet.server.fleet.store import (
    IngestBatch,
    IngestOutcome,
    Store,
    open_store,
)
from edgefleet.server.local.waiting import wait_until
from tests.store.backends import Backend
from tests.store.payloads import (
    BOOT_A,
    T0,
    event,
    status,
    telemetry,
)


def test_ingest_of_500_message_batches_stores_every_window(store: Store) -> None:
    # Its speed is measured by bench.ingest, not asserted here.
    for b in range(6):
        batch = IngestBatch(
            telemetry=[
                telemetry(f"dev-{d:03d}", b * 9 + s, T0 + b * 100 + s)
                for d in range(50)
                for s in range(9)
            ],
            statuses=[status(f"dev-{d:03d}", BOOT_A, T0 + b, T0 + b) for d in range(25)],
            events=[event(f"dev-{d:03d}", b, T0 + b) for d in range(25)],
        )
        assert len(batch) == 500
        store.ingest(batch)
        assert store.telemetry_count() == (b + 1) * 450


def _ingest_worker(url: str, order: list[int], barrier: Any, results: Any) -> None:
    """One coordinator process: its own store object, batches of 4 devices x 25 seqs."""
    barrier.wait(30)
    store = open_store(url)  # both migrate the empty database at the same time
    try:
        inserted = duplicates = events = 0
        for first in order:
            seqs = range(first, first + 25)
            batch = IngestBatch(
                statuses=[status(f"pi-{d}", BOOT_A, T0, T0 + first) for d in range(4)],
                telemetry=[telemetry(f"pi-{d}", s, T0 + s) for d in range(4) for s in seqs],
                events=[event(f"pi-{d}", s, T0 + s) for d in (3, 2, 1, 0) for s in seqs],
            )
            out = store.ingest(batch)
            inserted += out.telemetry_inserted
            duplicates += out.telemetry_duplicates
            events += out.events_inserted
        results.put((inserted, duplicates, events))
    finally:
        store.close()


def test_two_processes_ingest_overlapping_batches_exactly_once(backend: Backend) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    # Both start on the shared range 100..199 at the same time, then go separate ways.
    orders = [[100, 125, 150, 175, 0, 25, 50, 75], [100, 125, 150, 175, 275, 250, 225, 200]]
    procs = [
        ctx.Process(target=_ingest_worker, args=(backend.url, order, barrier, results))
        for order in orders
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outs = [results.get(timeout=5) for _ in procs]
    assert sum(o[0] for o in outs) == 4 * 300
    assert sum(o[1] for o in outs) == 4 * 100
    assert sum(o[2] for o in outs) == 4 * 300

    store = open_store(backend.url)
    try:
        assert store.telemetry_count() == 4 * 300
        assert backend.count("events") == 4 * 300
        reports = store.sequence_reports()
        assert [r.device_id for r in reports] == ["pi-0", "pi-1", "pi-2", "pi-3"]
        for r in reports:
            assert (r.first_seq, r.max_seq, r.received, r.duplicates, r.missing) == (
                0,
                299,
                300,
                100,
                0,
            )
        d = store.device("pi-0")
        assert d is not None and d.online and d.id_conflicts == 0
        assert d.last_telemetry is not None and d.last_telemetry.seq == 299
    finally:
        store.close()


def test_a_device_registered_meanwhile_elsewhere_is_locked_not_registered(
    postgres_dsn: str,
) -> None:
    # Another coordinator registers pi-1 and has not committed yet when this one ingests its
    # first window: the insert waits for that commit, then the row is locked and updated.
    store = open_store(postgres_dsn)
    result: dict[str, IngestOutcome] = {}
    try:
        with psycopg.connect(postgres_dsn) as other, psycopg.connect(postgres_dsn) as watch:
            with other.transaction():
                other.execute(
                    "INSERT INTO devices (device_id, registered_at, first_seen, last_seen) "
                    "VALUES ('pi-1', %s, %s, %s)",
                    (T0, T0, T0),
                )
                writer = threading.Thread(
                    target=lambda: result.update(
                        out=store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 0, T0 + 5)]))
                    )
                )
                writer.start()
                wait_until(
                    lambda: _waiting_on_locks(watch) > 0, 10, "the ingest to wait for the insert"
                )
            writer.join(10)
        out = result["out"]
        assert out.devices_registered == () and out.telemetry_inserted == 1
        d = store.device("pi-1")
        assert d is not None and (d.first_seen, d.last_seen) == (T0, T0 + 5)
        assert d.last_telemetry is not None and d.last_telemetry.seq == 0
        (rep,) = store.sequence_reports("pi-1")
        assert (rep.first_seq, rep.max_seq, rep.received) == (0, 0, 1)
    finally:
        store.close()


def _waiting_on_locks(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    assert row is not None
    return int(row[0])
