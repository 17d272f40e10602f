"""Sequence accounting: clock skew, gaps declared lost, late arrivals un-lost."""

from __future__ import annotations

from edgefleet.server.fleet.store import (
    IngestBatch,
    Store,
)
from tests.store.payloads import (
    T0,
    telemetry,
)


def test_clock_skew_is_counted_and_still_stored(store: Store) -> None:
    out = store.ingest(
        IngestBatch(
            telemetry=[
                telemetry("pi-1", 0, T0),
                telemetry("pi-1", 1, T0, skew_s=Store.CLOCK_TOLERANCE_S + 5),
                telemetry("pi-1", 2, T0, skew_s=-(Store.CLOCK_TOLERANCE_S + 5)),
                telemetry("pi-1", 3, T0, skew_s=Store.CLOCK_TOLERANCE_S - 5),
            ]
        )
    )
    assert (out.clock_skewed, out.telemetry_inserted) == (2, 4)


def test_declare_losses_after_grace_and_un_lose_on_late_arrival(store: Store) -> None:
    # pi-1: 0..19 without 3, 4, 7; 21 came late (just above the gap 20) so 20 is still young.
    seqs = [s for s in range(20) if s not in (3, 4, 7)]
    batch = [telemetry("pi-1", s, T0 + s) for s in seqs]
    batch.append(telemetry("pi-1", 21, T0 + 900))
    batch += [telemetry("pi-2", s, T0 + s) for s in range(5)]  # no gaps
    store.ingest(IngestBatch(telemetry=batch))
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.first_seq, rep.max_seq, rep.received, rep.missing, rep.lost) == (0, 21, 18, 4, 0)

    assert store.declare_losses(now=T0 + 200, grace_s=300) == 0
    assert store.declare_losses(now=T0 + 1000, grace_s=300) == 3  # 3, 4 and 7; not 20
    assert store.declare_losses(now=T0 + 1000, grace_s=300) == 0
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.missing, rep.lost) == (4, 3)
    assert store.declare_losses(now=T0 + 1300, grace_s=300) == 1  # 20 grew old
    # 4 arrives after all: no longer lost, counted as received; 3 and 7 stay lost.
    out = store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 4, T0 + 1400)]))
    assert out.telemetry_inserted == 1
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.received, rep.missing, rep.lost) == (19, 3, 3)
    # The split range {3} and {7}, {20} are still recorded: nothing is declared twice.
    assert store.declare_losses(now=T0 + 5000, grace_s=300) == 0
    store.ingest(IngestBatch(telemetry=[telemetry("pi-1", s, T0 + 5001) for s in (3, 7, 20)]))
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.received, rep.missing, rep.lost) == (22, 0, 0)
    (rep2,) = store.sequence_reports("pi-2")
    assert (rep2.missing, rep2.lost) == (0, 0)


def test_windows_the_device_reported_dropped_count_as_dropped_not_lost(store: Store) -> None:
    # pi-1 dropped 5..9 (its outbox drops the oldest first) and says so from seq 10 on; seq 3
    # vanished on the way. Lifetime counts only grow: the max over windows is what counts.
    seqs = [s for s in range(20) if s != 3 and not 5 <= s <= 9]
    store.ingest(
        IngestBatch(
            telemetry=[telemetry("pi-1", s, T0 + s, overflow=5 if s >= 10 else 0) for s in seqs]
        )
    )
    assert store.declare_losses(now=T0 + 1000, grace_s=300) == 1  # only 3 is lost
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.missing, rep.lost, rep.dropped, rep.reported_overflow) == (6, 1, 5, 5)
    # Nothing is attributed twice, and the count does not grow by itself.
    assert store.declare_losses(now=T0 + 2000, grace_s=300) == 0
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.lost, rep.dropped) == (1, 5)


def test_a_drop_reported_after_the_gap_was_declared_lost_turns_lost_into_dropped(
    store: Store,
) -> None:
    # Windows above the gap arrived before the device's count did (the count rides in windows
    # made after the drop): the gap is declared lost first, then re-attributed oldest first.
    store.ingest(IngestBatch(telemetry=[telemetry("pi-1", s, T0 + s) for s in (0, 1, 2, 6, 7)]))
    assert store.declare_losses(now=T0 + 1000, grace_s=300) == 3
    store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 8, T0 + 1001, overflow=2)]))
    store.declare_losses(now=T0 + 1002, grace_s=300)
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.missing, rep.lost, rep.dropped) == (3, 1, 2)
    # A window thought dropped that still arrives is received, and no longer dropped.
    store.ingest(IngestBatch(telemetry=[telemetry("pi-1", 3, T0 + 1003, overflow=0)]))
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.received, rep.missing, rep.lost + rep.dropped) == (7, 2, 2)
    store.ingest(IngestBatch(telemetry=[telemetry("pi-1", s, T0 + 1004) for s in (4, 5)]))
    (rep,) = store.sequence_reports("pi-1")
    assert (rep.missing, rep.lost, rep.dropped) == (0, 0, 0)
