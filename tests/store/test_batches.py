"""Ingesting batches: registration, exactly-once telemetry and events, rejects."""

from __future__ import annotations

from edgefleet.server.fleet.store import (
    IngestBatch,
    Store,
    logic,
)
from tests.store.backends import Backend
from tests.store.payloads import (
    BOOT_A,
    BOOT_B,
    T0,
    event,
    reject,
    reply,
    status,
    telemetry,
)


def test_ingest_registers_devices_and_stores_telemetry(store: Store) -> None:
    batch = IngestBatch(
        telemetry=[telemetry("pi-2", s, T0 + 10 * s) for s in (0, 1, 2)]
        + [telemetry("pi-1", s, T0 + 10 * s, overflow=s) for s in (5, 7, 6)]
    )
    out = store.ingest(batch)
    assert out.devices_registered == ("pi-1", "pi-2")
    assert (out.telemetry_inserted, out.telemetry_duplicates, out.clock_skewed) == (6, 0, 0)
    assert store.telemetry_count() == 6

    pi1 = store.device("pi-1")
    assert pi1 is not None
    assert (pi1.first_seen, pi1.last_seen) == (T0 + 50, T0 + 70)
    assert pi1.status is None and not pi1.online and pi1.group is None
    # The newest window is the highest seq, not the last one to arrive.
    assert pi1.last_telemetry == batch.telemetry[4].telemetry
    assert [r.seq for r in store.telemetry("pi-1")] == [7, 6, 5]
    assert store.telemetry("pi-1", limit=1)[0].received_at == T0 + 70
    assert store.telemetry("pi-1")[0].telemetry == batch.telemetry[4].telemetry

    (rep,) = store.sequence_reports("pi-1")
    assert (rep.first_seq, rep.max_seq, rep.received, rep.missing) == (5, 7, 3, 0)
    assert rep.reported_overflow == 7
    assert [r.device_id for r in store.sequence_reports()] == ["pi-1", "pi-2"]
    assert store.device("nope") is None

    # A known device is not registered again.
    assert (
        store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 8, T0 + 80)])).devices_registered
        == ()
    )


def test_duplicates_are_counted_never_stored_twice(store: Store) -> None:
    first = [telemetry("pi-1", s, T0 + s) for s in range(10)]
    out = store.ingest(IngestBatch(telemetry=first, events=[event("pi-1", 3, T0)]))
    assert (out.telemetry_inserted, out.telemetry_duplicates) == (10, 0)
    assert (out.events_inserted, out.events_duplicates) == (1, 0)
    # A redelivery of half of them, a new window twice in the same batch, an event again.
    again = [telemetry("pi-1", s, T0 + 100 + s) for s in range(5)]
    twice = [telemetry("pi-1", 10, T0 + 200), telemetry("pi-1", 10, T0 + 201)]
    out = store.ingest(IngestBatch(telemetry=again + twice, events=[event("pi-1", 3, T0 + 5)] * 2))
    assert (out.telemetry_inserted, out.telemetry_duplicates) == (1, 6)
    assert (out.events_inserted, out.events_duplicates) == (0, 2)
    assert store.telemetry_count() == 11
    # The first copy stays: a redelivery does not rewrite when a window was received.
    assert {r.seq: r.received_at for r in store.telemetry("pi-1")}[2] == T0 + 2
    (rep,) = store.sequence_reports()
    assert (rep.received, rep.duplicates, rep.missing) == (11, 6, 0)
    assert len(store.events("pi-1")) == 1
    device = store.device("pi-1")
    assert device is not None and device.last_seen == T0 + 201


def test_closed_registration_rejects_unknown_devices(store: Store, backend: Backend) -> None:
    store.register("pi-1", group="lab-b")
    store.register("pi-1")  # again, without a group: keeps the group
    batch = IngestBatch(
        statuses=[status("pi-1", BOOT_A, T0, T0, group=None), status("pi-9", BOOT_B, T0, T0)],
        telemetry=[telemetry("pi-1", 0, T0 + 1), telemetry("pi-9", 0, T0 + 1)],
        events=[event("pi-9", 0, T0 + 2)],
        replies=[reply("c-1", "pi-9", T0 + 3)],
        rejects=[reject(T0, "oversized")],
    )
    out = store.ingest(batch, registration_open=False)
    assert out.unregistered == 4
    assert out.devices_registered == ()
    assert (out.telemetry_inserted, out.events_inserted) == (1, 0)
    assert [d.device_id for d in store.devices()] == ["pi-1"]
    pi1 = store.device("pi-1")
    assert pi1 is not None and pi1.group == "lab-b" and pi1.online
    counts = store.reject_counts()
    assert counts["unregistered"] == 4 and counts["oversized"] == 1
    assert counts["invalid_topic"] == 0
    assert backend.count("rejects") == 5

    # Open again: the same messages register the device.
    out = store.ingest(batch, registration_open=True)
    assert out.devices_registered == ("pi-9",) and out.unregistered == 0
    assert store.reject_counts()["unregistered"] == 4


def test_rejects_log_keeps_the_newest_rows_and_counts_all(store: Store, backend: Backend) -> None:
    n = logic.MAX_REJECT_ROWS + 25
    store.ingest(IngestBatch(rejects=[reject(T0 + i) for i in range(n)]))
    store.ingest(IngestBatch(rejects=[reject(T0 + n, "invalid_topic")]))
    assert backend.count("rejects") == logic.MAX_REJECT_ROWS
    counts = store.reject_counts()
    assert counts["invalid_payload"] == n and counts["invalid_topic"] == 1
    assert set(counts) == {
        "invalid_topic",
        "invalid_payload",
        "oversized",
        "device_mismatch",
        "unregistered",
        "unstorable",
    }
