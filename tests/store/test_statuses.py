"""Device statuses: arrival order, late Wills, groups, two agents with one id."""

from __future__ import annotations

import pytest

from edgefleet.server.fleet.store import (
    IngestBatch,
    Store,
)
from tests.store.payloads import (
    BOOT_A,
    BOOT_B,
    BOOT_C,
    T0,
    status,
)


def test_status_birth_then_will_then_late_will_of_an_earlier_session(store: Store) -> None:
    birth = status("pi-1", BOOT_A, T0, T0)
    will = status("pi-1", BOOT_A, T0, T0 + 60, online=False)
    store.ingest(IngestBatch(statuses=[birth]))
    d = store.device("pi-1")
    assert d is not None and d.online and d.group == "lab-a" and d.status == birth.status
    # Equal ts, same boot: arrival order decides, so the Will that came later wins.
    store.ingest(IngestBatch(statuses=[will]))
    d = store.device("pi-1")
    assert d is not None and not d.online and d.status == will.status
    # Same order inside one batch: birth, will, then a reconnect of the same process.
    reconnect = status("pi-1", BOOT_A, T0 + 100, T0 + 101, operating_point=2)
    old_will = status("pi-1", BOOT_A, T0, T0 + 102, online=False)
    store.ingest(IngestBatch(statuses=[reconnect, old_will]))
    d = store.device("pi-1")
    assert d is not None and d.online
    assert d.status is not None and d.status.operating_point == 2
    assert d.last_seen == T0 + 102
    # The old session's Will in a later batch is ignored too.
    store.ingest(IngestBatch(statuses=[old_will]))
    d = store.device("pi-1")
    assert d is not None and d.online and d.id_conflicts == 0


def test_status_group_only_when_the_status_carries_one(store: Store) -> None:
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0, T0, group=None)]))
    d = store.device("pi-1")
    assert d is not None and d.group is None
    store.set_group("pi-1", "ops")
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0 + 1, T0 + 1, group=None)]))
    d = store.device("pi-1")
    assert d is not None and d.group == "ops"
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0 + 2, T0 + 2, group="lab-c")]))
    d = store.device("pi-1")
    assert d is not None and d.group == "lab-c"
    store.set_group("pi-1", None)
    d = store.device("pi-1")
    assert d is not None and d.group is None
    with pytest.raises(KeyError):
        store.set_group("nope", "ops")


def test_id_conflict_is_a_birth_of_a_replaced_boot(store: Store) -> None:
    # A restart (A then B) is no conflict; A coming back while B was current is.
    out = store.ingest(
        IngestBatch(
            statuses=[
                status("pi-1", BOOT_A, T0, T0),
                status("pi-1", BOOT_A, T0, T0 + 5, online=False),
                status("pi-1", BOOT_B, T0 + 10, T0 + 10),
            ]
        )
    )
    assert out.id_conflicts == ()
    out = store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0 + 20, T0 + 20)]))
    assert out.id_conflicts == ("pi-1",)
    d = store.device("pi-1")
    assert d is not None and d.id_conflicts == 1
    # Still applied: it is what the device id says now.
    assert d.online and d.status is not None and d.status.boot_id == BOOT_A
    # Flapping: B again, in the same batch as a third, new agent C (no conflict for C).
    out = store.ingest(
        IngestBatch(
            statuses=[status("pi-1", BOOT_B, T0 + 30, T0 + 30), status("pi-1", BOOT_C, T0, T0 + 31)]
        )
    )
    assert out.id_conflicts == ("pi-1",)
    d = store.device("pi-1")
    assert d is not None and d.id_conflicts == 2
    assert d.status is not None and d.status.boot_id == BOOT_C


def test_late_will_of_a_replaced_boot_is_ignored(store: Store) -> None:
    store.ingest(
        IngestBatch(
            statuses=[
                status("pi-1", BOOT_A, T0, T0),
                status("pi-1", BOOT_B, T0 + 10, T0 + 10),
                # A's Will, delivered after B's birth (through another coordinator).
                status("pi-1", BOOT_A, T0, T0 + 11, online=False),
            ]
        )
    )
    d = store.device("pi-1")
    assert d is not None and d.online
    assert d.status is not None and d.status.boot_id == BOOT_B
