"""Lost sequence numbers: gaps declared lost after a grace period, and late arrivals un-lost.

Lost seqs are kept as ranges per device (lost_ranges); the device row's lost counter is their
total size. Both functions run inside a write transaction of any backend (see sql.Sql).
"""

from __future__ import annotations

from collections.abc import Sequence

from edgefleet.server.fleet.store import logic
from edgefleet.server.fleet.store.sql import LOST_RANGES, Lock, Sql

# Devices with seqs that are missing but not yet declared lost: the only ones worth a scan.
_CANDIDATES = """
SELECT device_id FROM devices
WHERE max_seq IS NOT NULL AND max_seq - first_seq + 1 - received - lost > 0
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


def declare(sql: Sql, now: float, grace_s: float) -> int:
    """Record gaps that stayed open longer than grace_s as lost; return how many seqs."""
    sql.lock(Lock.LOSSES)
    # Locking the candidates makes an ingest of one of their seqs wait, so a seq is never
    # both declared lost here and counted as received there.
    candidates = [str(r[0]) for r in sql.rows(_CANDIDATES + sql.FOR_UPDATE)]
    if not candidates:
        return 0
    gaps = [
        (str(d), int(a), int(b))
        for d, a, b in sql.rows(
            _GAPS.format(in_list=sql.IN_LIST), (sql.as_list(candidates), now - grace_s)
        )
    ]
    if not gaps:
        return 0
    known: dict[str, list[logic.SeqRange]] = {}
    for d, a, b in sql.rows(
        f"SELECT device_id, first_seq, last_seq FROM lost_ranges WHERE device_id {sql.IN_LIST}",
        (sql.as_list(sorted({g[0] for g in gaps})),),
    ):
        known.setdefault(str(d), []).append((int(a), int(b)))
    new: list[tuple[str, int, int, float]] = []
    per_device: dict[str, int] = {}
    for d, a, b in gaps:
        for piece in logic.uncovered((a, b), known.get(d, [])):
            new.append((d, piece[0], piece[1], now))
            per_device[d] = per_device.get(d, 0) + logic.range_size(piece)
    if not new:
        return 0
    sql.insert(LOST_RANGES, new)
    sql.many(
        "UPDATE devices SET lost = lost + ? WHERE device_id = ?",
        [(n, d) for d, n in sorted(per_device.items())],
    )
    return sum(per_device.values())


def unlose(sql: Sql, device_id: str, seqs: Sequence[int]) -> int:
    """Take arrived seqs out of the device's lost ranges; return how many were lost."""
    ranges = sql.rows(
        "SELECT first_seq, last_seq, declared_at FROM lost_ranges "
        "WHERE device_id = ? AND last_seq >= ? AND first_seq <= ?",
        (device_id, min(seqs), max(seqs)),
    )
    total = 0
    for first, last, declared_at in ranges:
        pieces, removed = logic.remove_seqs([(int(first), int(last))], seqs)
        if not removed:
            continue
        total += removed
        sql.run("DELETE FROM lost_ranges WHERE device_id = ? AND first_seq = ?", (device_id, first))
        if pieces:
            sql.insert(LOST_RANGES, [(device_id, a, b, declared_at) for a, b in pieces])
    return total
