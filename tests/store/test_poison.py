"""A message the store can never hold is rejected alone; an unavailable store keeps everything.

Issue 12: a telemetry seq of 2**63 made SQLite raise at bind time and PostgreSQL answer
"bigint out of range"; the writer took that for an outage and retried the batch forever.
The protocol now refuses such a seq at decode, so these tests build the poisoned messages
behind the decoder's back (model_construct), as a future field without bounds would.
"""

from __future__ import annotations

import json
import sqlite3

import psycopg
import pytest

from edgefleet.agent.protocol import Event, Telemetry, TopicTree, encode
from edgefleet.server.fleet.store import IngestBatch, SqliteStore, Store, open_store
from edgefleet.server.fleet.store.base import EventIn, TelemetryIn
from edgefleet.server.fleet.store.errors import StoreRefused, StoreUnavailable
from edgefleet.server.fleet.store.isolate import IsolationStopped, Item, ingest_isolating
from edgefleet.server.fleet.writer import Decoder, RawMessage, write_batch
from tests import protocol_samples as samples
from tests.store.backends import Backend
from tests.store.payloads import T0, event, status, telemetry

BOOT = "3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b"


def poisoned_telemetry(device_id: str, seq: int, **changes: object) -> TelemetryIn:
    """A window whose fields were never validated (raw=None: the store serializes it)."""
    good = telemetry(device_id, 0, T0).telemetry
    fields = {**dict(good), "seq": seq, **changes}
    return TelemetryIn(T0, Telemetry.model_construct(**fields))


def poisoned_event(device_id: str, seq: int) -> EventIn:
    good = event(device_id, 0, T0).event
    return EventIn(T0, Event.model_construct(**{**dict(good), "seq": seq}))


def test_an_out_of_range_seq_is_refused_for_good_not_an_outage(store: Store) -> None:
    for poison in (
        IngestBatch(telemetry=[poisoned_telemetry("pi-1", 2**63)]),
        IngestBatch(telemetry=[poisoned_telemetry("pi-1", 1, outbox_overflow=2**63)]),
        IngestBatch(events=[poisoned_event("pi-1", 2**63)]),
    ):
        with pytest.raises(StoreRefused):
            store.ingest(poison)
    # The refused transactions left nothing behind and the store works on.
    assert store.telemetry_count() == 0 and store.events() == []
    assert store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 0, T0)])).telemetry_inserted == 1


def test_a_poisoned_message_is_isolated_and_every_other_one_stored(
    store: Store, backend: Backend
) -> None:
    items: list[Item] = [status(f"pi-{i}", BOOT, T0, T0) for i in range(3)]
    items += [telemetry(f"pi-{i % 3}", i, T0 + i) for i in range(20)]
    items.insert(7, poisoned_telemetry("pi-bad", 2**63))
    items.insert(15, poisoned_event("pi-1", 2**64))
    items += [event("pi-2", 0, T0)]

    done = ingest_isolating(store, items, registration_open=True)
    assert [r.reason for r in done.refused] == ["unstorable", "unstorable"]
    assert done.committed == len(items) and len(done.stored) == len(items) - 2
    assert store.telemetry_count() == 20
    assert {(e.device_id, e.seq) for e in store.events()} == {("pi-2", 0)}
    assert {d.device_id for d in store.devices()} == {"pi-0", "pi-1", "pi-2"}
    assert store.reject_counts()["unstorable"] == 2
    assert backend.count("rejects") == 2
    assert done.outcome().telemetry_inserted == 20

    # Delivered again (a redelivery after a crash): every good message is a duplicate, once.
    again = ingest_isolating(store, items, registration_open=True)
    assert again.outcome().telemetry_duplicates == 20 and again.outcome().telemetry_inserted == 0
    reports = {r.device_id: r for r in store.sequence_reports()}
    assert sum(r.received for r in reports.values()) == 20
    assert sum(r.duplicates for r in reports.values()) == 20
    assert store.reject_counts()["unstorable"] == 4


def test_an_unavailable_store_is_transient_and_stops_with_what_was_committed(
    store: Store, backend: Backend
) -> None:
    impatient = _impatient(backend)
    locker = _hold_write_lock(backend)
    items: list[Item] = [telemetry("pi-1", i, T0 + i) for i in range(4)]
    try:
        with pytest.raises(IsolationStopped) as stopped:
            ingest_isolating(impatient, items, registration_open=True)
        assert isinstance(stopped.value.cause, StoreUnavailable), stopped.value.cause
        assert stopped.value.done.committed == 0
    finally:
        locker.close()
        impatient.close()
    assert ingest_isolating(store, items, registration_open=True).committed == 4


def _hold_write_lock(backend: Backend) -> sqlite3.Connection | psycopg.Connection[tuple[object]]:
    """Another client holding what an ingest needs, so the store is busy, not wrong."""
    if backend.name == "sqlite":
        conn = sqlite3.connect(backend.url[len("sqlite://") :], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        return conn
    pg: psycopg.Connection[tuple[object]] = psycopg.connect(backend.url)
    pg.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
    return pg


def _impatient(backend: Backend) -> Store:
    """A store that gives up on a lock at once (a busy database, as under load)."""
    if backend.name == "sqlite":
        return SqliteStore(backend.url[len("sqlite://") :], busy_timeout_s=0.05)
    return open_store(backend.url + " options='-c lock_timeout=100'")


def test_the_poison_of_issue_12_is_rejected_at_decode_and_the_rest_stored(store: Store) -> None:
    root = "edgefleet/v1"
    tree = TopicTree(root)
    poison = json.loads(encode(samples.telemetry("poison-dev", 1)))
    raws: list[RawMessage] = []
    for field in ("seq", "outbox_overflow"):
        raws.append((tree.device("poison-dev", "telemetry"), _with(poison, field, 2**63), T0))
    ev = json.loads(encode(samples.event().model_copy(update={"device_id": "poison-dev"})))
    raws.append((tree.device("poison-dev", "events"), _with(ev, "seq", 2**63), T0))
    raws += [
        (tree.device(f"pi-{i}", "telemetry"), encode(samples.telemetry(f"pi-{i}", i)), T0)
        for i in range(13)
    ]
    written = write_batch(Decoder(root), store, raws, registration_open=True)
    assert written.rejects == ["invalid_payload"] * 3
    assert written.outcome.telemetry_inserted == 13 and store.telemetry_count() == 13


def _with(obj: dict[str, object], field: str, value: object) -> bytes:
    return json.dumps({**obj, field: value}).encode()
