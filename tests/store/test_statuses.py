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


def test_status_birth_then_will_then_reconnect_in_arrival_order(store: Store) -> None:
    birth = status("pi-1", BOOT_A, T0, T0)
    will = status("pi-1", BOOT_A, T0, T0 + 60, online=False)
    store.ingest(IngestBatch(statuses=[birth]))
    d = store.device("pi-1")
    assert d is not None and d.online and d.group == "lab-a" and d.status == birth.status
    # Same boot: arrival order decides, so the Will that came later wins.
    store.ingest(IngestBatch(statuses=[will]))
    d = store.device("pi-1")
    assert d is not None and not d.online and d.status == will.status
    # A reconnect of the same process: the broker sent the old session's Will when the new
    # connection took the client id over, so before the new birth; the birth came last.
    old_will = status("pi-1", BOOT_A, T0, T0 + 100, online=False)
    reconnect = status("pi-1", BOOT_A, T0 + 100, T0 + 101, operating_point=2)
    store.ingest(IngestBatch(statuses=[old_will, reconnect]))
    d = store.device("pi-1")
    assert d is not None and d.online
    assert d.status is not None and d.status.operating_point == 2
    assert d.last_seen == T0 + 101
    # A status of the current boot that came later wins whatever its ts (here older).
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0, T0 + 102, online=False)]))
    d = store.device("pi-1")
    assert d is not None and not d.online and d.id_conflicts == 0


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
    # Not applied: A is an older boot than B (first seen before it); B's status stays.
    assert d.online and d.status is not None and d.status.boot_id == BOOT_B
    # Flapping: B (current, no conflict), then A again, in the same batch as a third, new
    # agent C (no conflict for C).
    out = store.ingest(
        IngestBatch(
            statuses=[
                status("pi-1", BOOT_B, T0 + 30, T0 + 30),
                status("pi-1", BOOT_A, T0 + 30, T0 + 30),
                status("pi-1", BOOT_C, T0, T0 + 31),
            ]
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


# The largest ts the protocol admits (year 9999): any status can carry it.
_FAR_FUTURE = 253_402_214_400.0


def test_a_forged_future_ts_does_not_keep_a_killed_agent_online(store: Store) -> None:
    # Someone publishes an online status of the current boot with a far-future ts; then the
    # agent is SIGKILLed and the broker sends its Will (the birth's ts, offline). The Will came
    # last, for the current boot: the device is offline.
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0, T0)]))
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, _FAR_FUTURE, T0 + 5)]))
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, T0, T0 + 60, online=False)]))
    d = store.device("pi-1")
    assert d is not None and not d.online
    # ts stays informational: the stored status is the Will as it came.
    assert d.status is not None and d.status.ts == T0


def test_a_status_of_an_older_boot_never_overrides_a_newer_boot(store: Store) -> None:
    store.ingest(
        IngestBatch(statuses=[status("pi-1", BOOT_A, T0, T0), status("pi-1", BOOT_B, T0, T0 + 10)])
    )
    # A's Will (or a forgery for A) with any ts, after B was first seen: B stays.
    for online, ts in [(False, _FAR_FUTURE), (True, _FAR_FUTURE), (False, T0 + 20)]:
        store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_A, ts, T0 + 30, online=online)]))
        d = store.device("pi-1")
        assert d is not None and d.online
        assert d.status is not None and d.status.boot_id == BOOT_B
    # B's own Will, even with a ts older than B's birth, applies: it came later, same boot.
    store.ingest(IngestBatch(statuses=[status("pi-1", BOOT_B, T0 - 100, T0 + 40, online=False)]))
    d = store.device("pi-1")
    assert d is not None and not d.online and d.status is not None
    assert d.status.boot_id == BOOT_B
