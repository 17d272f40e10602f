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
    a = logic.StatusState(BOOT_A, T0)
    birth_a = status("pi-1", BOOT_A, T0, T0).status
    will_a_old = status("pi-1", BOOT_A, T0 - 1, T0, online=False).status
    birth_b_old = status("pi-1", BOOT_B, T0 - 100, T0).status
    will_b_old = status("pi-1", BOOT_B, T0 - 100, T0, online=False).status
    assert logic.status_applies(logic.StatusState(None, None), will_a_old)
    assert logic.status_applies(a, birth_a)  # equal ts
    assert not logic.status_applies(a, will_a_old)
    assert logic.status_applies(a, birth_b_old)  # another boot's birth: a restart
    assert not logic.status_applies(a, will_b_old)
    assert not logic.is_id_conflict(a, {BOOT_A}, birth_b_old)
    assert logic.is_id_conflict(a, {BOOT_A, BOOT_B}, birth_b_old)
    assert not logic.is_id_conflict(a, {BOOT_A, BOOT_B}, will_b_old)

    fold = logic.fold_statuses(
        logic.StatusState(None, None),
        set(),
        [
            status("pi-1", BOOT_A, T0, T0, group="g1"),
            status("pi-1", BOOT_B, T0 + 5, T0 + 2, group=None),
            status("pi-1", BOOT_A, T0 + 9, T0 + 3, group=None),
        ],
    )
    assert fold.conflicts == 1 and fold.group == "g1"
    assert fold.applied is not None and fold.applied.boot_id == BOOT_A
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
