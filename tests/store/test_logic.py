"""The store's pure decisions, tested without a database."""

from __future__ import annotations

from edgefleet.server.fleet.store import (
    logic,
)
from tests.store.payloads import (
    BOOT_A,
    BOOT_B,
    T0,
    status,
    telemetry,
)


def test_status_rules() -> None:
    # A is current (received at T0); ts is never looked at, only boots and arrival.
    a = logic.StatusState(BOOT_A, T0)
    will_a_later = status("pi-1", BOOT_A, T0 - 1, T0 + 1, online=False)
    will_a_earlier = status("pi-1", BOOT_A, T0 + 1e6, T0 - 1, online=False)
    birth_b_new = status("pi-1", BOOT_B, T0 - 100, T0 + 1)
    only_a = {BOOT_A: T0 - 10}
    b_older = {BOOT_A: T0 - 10, BOOT_B: T0 - 20}
    assert logic.status_applies(logic.StatusState(None, None), {}, will_a_later)
    assert logic.status_applies(a, only_a, will_a_later)  # same boot, came later
    assert not logic.status_applies(a, only_a, will_a_earlier)  # came earlier, whatever ts
    assert logic.status_applies(logic.StatusState(BOOT_A, None), only_a, will_a_earlier)
    assert logic.status_applies(a, only_a, birth_b_new)  # a boot never seen: a restart
    assert not logic.status_applies(a, b_older, birth_b_new)  # B was first seen before A
    assert logic.status_applies(a, {BOOT_A: T0 - 10, BOOT_B: T0 - 5}, birth_b_new)
    assert not logic.is_id_conflict(a, {BOOT_A}, birth_b_new.status)
    assert logic.is_id_conflict(a, {BOOT_A, BOOT_B}, birth_b_new.status)
    will_b = status("pi-1", BOOT_B, T0, T0, online=False).status
    assert not logic.is_id_conflict(a, {BOOT_A, BOOT_B}, will_b)

    fold = logic.fold_statuses(
        logic.StatusState(None, None),
        {},
        [
            status("pi-1", BOOT_A, T0, T0, group="g1"),
            status("pi-1", BOOT_B, T0 + 5, T0 + 2, group=None),
            status("pi-1", BOOT_A, T0 + 9, T0 + 3, group=None),
        ],
    )
    # A's return after B is a conflict and does not apply: B was first seen later.
    assert fold.conflicts == 1 and fold.group == "g1"
    assert fold.applied is not None and fold.applied.boot_id == BOOT_B
    assert fold.applied_at == T0 + 2
    assert fold.boots == {BOOT_A: (T0, T0 + 3), BOOT_B: (T0 + 2, T0 + 2)}


def test_seq_ranges() -> None:
    assert logic.uncovered((3, 10), []) == [(3, 10)]
    assert logic.uncovered((3, 10), [(3, 4), (7, 7)]) == [(5, 6), (8, 10)]
    assert logic.uncovered((3, 10), [(1, 20)]) == []
    assert logic.uncovered((3, 10), [(9, 12), (0, 3)]) == [(4, 8)]
    assert logic.remove_seqs([(3, 10)], [3, 5, 10, 11]) == ([(4, 4), (6, 9)], 3)
    assert logic.remove_seqs([(5, 5), (8, 9)], [5]) == ([(8, 9)], 1)
    assert logic.split_oldest([(8, 9), (2, 4)], 4) == ([(2, 4), (8, 8)], [(9, 9)])
    assert logic.split_oldest([(2, 4)], 0) == ([], [(2, 4)])
    assert logic.split_oldest([(2, 4)], 9) == ([(2, 4)], [])
    tally = logic.tally_telemetry(
        [telemetry("pi-1", s, T0) for s in (4, 2, 4, 9)], {("pi-1", 4), ("pi-1", 2)}, 300
    )["pi-1"]
    assert (tally.inserted_seqs, tally.duplicates, tally.min_seq, tally.max_seq) == (
        [4, 2],
        2,
        2,
        4,
    )
    assert tally.newest is not None and tally.newest.seq == 4
    assert logic.lost_candidates(tally, given_up=1, max_seq_before=3) == [2]
    assert logic.lost_candidates(tally, given_up=0, max_seq_before=3) == []
    assert logic.missing(5, 14, 7) == 3
