"""Given-up sequence numbers: gaps declared dropped or lost after a grace period, late arrivals
taken back.

Given-up seqs are kept as ranges per device (lost_ranges), each either *dropped* (the device
reported dropping that many windows: Telemetry.outbox_overflow, a lifetime count) or *lost*
(gone without a word). The device row's dropped and lost counters are the total sizes of each
kind. The outbox evicts its oldest telemetry first, so reported drops are attributed to the
oldest given-up seqs not yet attributed: a gap that ages is dropped as far as the device's count
reaches and lost beyond it, and a count that arrives after its gap was declared lost turns the
oldest lost seqs into dropped ones. Both functions run inside a write transaction of any
backend (see sql.Sql).
"""

from __future__ import annotations

from collections.abc import Sequence

from edgefleet.server.fleet.store import logic
from edgefleet.server.fleet.store.sql import LOST_RANGES, Lock, Sql

# Devices worth a scan: seqs missing but not yet given up, or lost seqs that a reported drop
# not yet attributed may explain.
_CANDIDATES = """
SELECT device_id, reported_overflow - dropped, lost FROM devices
WHERE max_seq IS NOT NULL AND (max_seq - first_seq + 1 - received - lost - dropped > 0
                               OR (lost > 0 AND reported_overflow > dropped))
ORDER BY device_id
"""

# Gaps in the raw windows of some devices. The gap's age is the arrival of the window just
# above it: the newest arrival of all windows above would be refreshed by every live window,
# so a gap of a live device would never grow old.
_GAPS = """
SELECT device_id, prev_seq + 1, seq - 1 FROM (
    SELECT device_id, seq, received_at,
           lag(seq) OVER (PARTITION BY device_id ORDER BY seq) AS prev_seq
    FROM telemetry
    WHERE device_id {in_list}
) AS t
WHERE prev_seq IS NOT NULL AND seq > prev_seq + 1 AND received_at < ?
ORDER BY device_id, seq
"""

_Range = tuple[int, int, float, bool]  # first, last, declared_at, dropped


def declare(sql: Sql, now: float, grace_s: float) -> int:
    """Give up gaps open longer than grace_s (dropped or lost); return how many seqs lost."""
    sql.lock(Lock.LOSSES)
    # Locking the candidates makes an ingest of one of their seqs wait, so a seq is never
    # both given up here and counted as received there.
    candidates = {
        str(d): (int(unattributed), int(lost))
        for d, unattributed, lost in sql.rows(_CANDIDATES + sql.FOR_UPDATE)
    }
    if not candidates:
        return 0
    gaps: dict[str, list[logic.SeqRange]] = {}
    for d, a, b in sql.rows(
        _GAPS.format(in_list=sql.IN_LIST), (sql.as_list(sorted(candidates)), now - grace_s)
    ):
        gaps.setdefault(str(d), []).append((int(a), int(b)))
    # Lost ranges can only turn dropped where the device reported more drops than attributed.
    relabel = {d for d, (unattributed, lost) in candidates.items() if unattributed > 0 < lost}
    devices = sorted(set(gaps) | relabel)
    if not devices:
        return 0
    known: dict[str, list[_Range]] = {}
    for d, a, b, at, dropped in sql.rows(
        "SELECT device_id, first_seq, last_seq, declared_at, dropped FROM lost_ranges "
        f"WHERE device_id {sql.IN_LIST}",
        (sql.as_list(devices),),
    ):
        known.setdefault(str(d), []).append((int(a), int(b), float(at), bool(dropped)))
    newly_lost = 0
    for d in devices:
        newly_lost += _give_up(sql, d, gaps.get(d, []), known.get(d, []), candidates[d][0], now)
    return newly_lost


def _give_up(
    sql: Sql,
    device_id: str,
    gaps: Sequence[logic.SeqRange],
    known: Sequence[_Range],
    unattributed: int,
    now: float,
) -> int:
    """Write one device's new given-up ranges and relabelled lost ones; return net new lost."""
    covered = [(a, b) for a, b, _, _ in known]
    new = [p for g in gaps for p in logic.uncovered(g, covered)]
    old_lost = [(a, b, at) for a, b, at, dropped in known if not dropped]
    if unattributed <= 0 or not (new or old_lost):
        rows = [(device_id, a, b, now, False) for a, b in new]
        relabelled: list[tuple[int, int, float]] = []
        dropped_n = 0
    else:
        # Lost ranges keep their declaration time through a relabel; new ones get now.
        declared = {a: at for a, _, at in old_lost}
        drop, keep = logic.split_oldest([*new, *((a, b) for a, b, _ in old_lost)], unattributed)
        relabelled = old_lost
        rows = [(device_id, a, b, declared.get(a, now), True) for a, b in drop]
        rows += [(device_id, a, b, declared.get(a, now), False) for a, b in keep]
        dropped_n = sum(logic.range_size(r) for r in drop)
    lost_before = sum(logic.range_size((a, b)) for a, b, _ in relabelled)
    lost_after = sum(logic.range_size((r[1], r[2])) for r in rows if not r[4])
    if not rows:
        return 0
    if relabelled:
        sql.many(
            "DELETE FROM lost_ranges WHERE device_id = ? AND first_seq = ?",
            [(device_id, a) for a, _, _ in relabelled],
        )
    sql.insert(LOST_RANGES, rows)
    sql.run(
        "UPDATE devices SET lost = lost + ?, dropped = dropped + ? WHERE device_id = ?",
        (lost_after - lost_before, dropped_n, device_id),
    )
    return max(lost_after - lost_before, 0)


def unlose(sql: Sql, device_id: str, seqs: Sequence[int]) -> tuple[int, int]:
    """Take arrived seqs out of the device's given-up ranges; return (were lost, were dropped)."""
    ranges = sql.rows(
        "SELECT first_seq, last_seq, declared_at, dropped FROM lost_ranges "
        "WHERE device_id = ? AND last_seq >= ? AND first_seq <= ?",
        (device_id, min(seqs), max(seqs)),
    )
    lost = dropped = 0
    for first, last, declared_at, was_dropped in ranges:
        pieces, removed = logic.remove_seqs([(int(first), int(last))], seqs)
        if not removed:
            continue
        if was_dropped:
            dropped += removed
        else:
            lost += removed
        sql.run("DELETE FROM lost_ranges WHERE device_id = ? AND first_seq = ?", (device_id, first))
        if pieces:
            sql.insert(
                LOST_RANGES,
                [(device_id, a, b, declared_at, bool(was_dropped)) for a, b in pieces],
            )
    return lost, dropped
