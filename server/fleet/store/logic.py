"""Decisions every store backend shares, kept free of SQL so they are tested once.

The ingest algorithm (ingest.py) reads what it needs under a lock (a row lock in PostgreSQL,
the database write lock in SQLite), asks these functions what a batch means, and writes the
answer.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from edgefleet.agent.protocol import Status, Telemetry
from edgefleet.server.fleet.store.base import (
    EventIn,
    IngestBatch,
    Reject,
    StatusIn,
    TelemetryIn,
)

# The rejects log is for looking at recent failures; the counters by reason are kept forever.
MAX_REJECT_ROWS = 10_000

SeqRange = tuple[int, int]  # inclusive (first, last)


# -- devices --------------------------------------------------------------------------------


def seen_span(batch: IngestBatch) -> dict[str, tuple[float, float]]:
    """Per device, the earliest and latest received_at of its messages in the batch.

    Every accepted message counts, duplicates and ignored statuses included: last_seen says
    when the device was last heard from, not when it last told us something new.
    """
    span: dict[str, tuple[float, float]] = {}

    def see(device_id: str, t: float) -> None:
        lo, hi = span.get(device_id, (t, t))
        span[device_id] = (min(lo, t), max(hi, t))

    for s in batch.statuses:
        see(s.status.device_id, s.received_at)
    for m in batch.telemetry:
        see(m.telemetry.device_id, m.received_at)
    for e in batch.events:
        see(e.event.device_id, e.received_at)
    for r in batch.replies:
        see(r.reply.device_id, r.received_at)
    return span


def split_unregistered(batch: IngestBatch, known: AbstractSet[str]) -> tuple[IngestBatch, int]:
    """Keep the messages of known devices; turn the others into 'unregistered' rejects.

    Returns the batch to write (its rejects list includes the new rejects) and how many
    messages were turned away. The store does not know the topic root, so the topic of such
    a reject is written relative to it: dev/{device}/{kind}.
    """
    out = IngestBatch(rejects=list(batch.rejects))
    turned_away = 0

    def reject(m_received: float, device_id: str, kind: str, what: str) -> None:
        nonlocal turned_away
        turned_away += 1
        out.rejects.append(
            Reject(
                received_at=m_received,
                topic=f"dev/{device_id}/{kind}",
                device_id=device_id,
                reason="unregistered",
                detail=f"{what} from unregistered device {device_id!r}",
            )
        )

    for s in batch.statuses:
        if s.status.device_id in known:
            out.statuses.append(s)
        else:
            reject(s.received_at, s.status.device_id, "status", "status")
    for t in batch.telemetry:
        if t.telemetry.device_id in known:
            out.telemetry.append(t)
        else:
            reject(
                t.received_at,
                t.telemetry.device_id,
                "telemetry",
                f"telemetry seq {t.telemetry.seq}",
            )
    for e in batch.events:
        if e.event.device_id in known:
            out.events.append(e)
        else:
            reject(e.received_at, e.event.device_id, "events", f"event seq {e.event.seq}")
    for r in batch.replies:
        if r.reply.device_id in known:
            out.replies.append(r)
        else:
            reject(r.received_at, r.reply.device_id, "reply", f"reply to {r.reply.id!r}")
    return out, turned_away


# -- statuses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusState:
    """The stored status of a device as far as ordering goes."""

    boot_id: str | None
    received_at: float | None  # when the stored status came; None if stored before schema v3


@dataclass(frozen=True)
class DeviceState:
    """What ingest reads of a stored device row (under its lock) before deciding."""

    boot_id: str | None
    status_received_at: float | None
    max_seq: int | None
    lost: int
    dropped: int

    @property
    def status(self) -> StatusState:
        return StatusState(self.boot_id, self.status_received_at)


def status_applies(current: StatusState, boots: Mapping[str, float], incoming: StatusIn) -> bool:
    """Tell whether incoming replaces the stored status.

    Statuses are ordered by (boot, received_at): boots in the order this coordinator first saw
    them (boots maps each known boot_id to that time), then by when this coordinator received
    the status, which is the broker's order for one device's topic. The status's own ts is
    never used: a client can put any ts in a status (a forged far-future ts must not keep a
    SIGKILLed agent online after its Will). So:
    - same boot: the later arrival wins, so the Will of the current boot beats its birth.
      The Will of an earlier session of the same process comes before the next session's
      birth, since the broker publishes it when the new connection takes the client id over.
    - another boot first seen earlier than the current one: never applies (the late Will of
      a replaced process, or a second agent with the same id coming back, see is_id_conflict).
    - a boot never seen before: a restart, it applies whatever its clock says.
    """
    if current.boot_id is None:
        return True
    s = incoming.status
    if s.boot_id == current.boot_id:
        return current.received_at is None or incoming.received_at >= current.received_at
    first, current_first = boots.get(s.boot_id), boots.get(current.boot_id)
    return first is None or current_first is None or first >= current_first


def is_id_conflict(current: StatusState, seen_boots: AbstractSet[str], incoming: Status) -> bool:
    """A birth of a boot_id that was already replaced by another: two agents share an id.

    One agent's boot_ids only move forward, so returning to an old one means another process
    is alive with it.
    """
    return (
        incoming.online
        and current.boot_id is not None
        and incoming.boot_id != current.boot_id
        and incoming.boot_id in seen_boots
    )


@dataclass(frozen=True)
class StatusFold:
    """What a device's statuses of one batch do."""

    state: StatusState  # the ordering state after the batch
    applied: Status | None  # the status to store; None when none applied
    group: str | None  # the group to set; None leaves the stored one
    conflicts: int
    boots: dict[str, tuple[float, float]]  # boot_id -> earliest, latest received_at

    @property
    def applied_at(self) -> float | None:
        """When the applied status was received."""
        return None if self.applied is None else self.state.received_at


def fold_statuses(
    current: StatusState, seen_boots: Mapping[str, float], statuses: Sequence[StatusIn]
) -> StatusFold:
    """Apply one device's statuses in arrival order (see status_applies, is_id_conflict).

    seen_boots maps the device's known boot_ids to when this coordinator first saw them.
    """
    state = current
    first_seen = dict(seen_boots)
    applied: Status | None = None
    group: str | None = None
    conflicts = 0
    boots: dict[str, tuple[float, float]] = {}
    for item in statuses:
        s = item.status
        if is_id_conflict(state, first_seen.keys(), s):
            conflicts += 1
        if status_applies(state, first_seen, item):
            applied = s
            state = StatusState(s.boot_id, item.received_at)
            # A status without a group leaves the operator's assignment alone.
            if s.group is not None:
                group = s.group
        first_seen.setdefault(s.boot_id, item.received_at)
        lo, hi = boots.get(s.boot_id, (item.received_at, item.received_at))
        boots[s.boot_id] = (min(lo, item.received_at), max(hi, item.received_at))
    return StatusFold(state, applied, group, conflicts, boots)


# -- telemetry ------------------------------------------------------------------------------


def is_clock_skewed(window_end: float, received_at: float, tolerance_s: float) -> bool:
    """The device clock disagrees with ours by more than tolerance_s.

    A window replayed from the outbox long after it ended is flagged too: one message cannot
    tell a late delivery from a wrong clock, so this is a hint to look, not a verdict.
    """
    return abs(window_end - received_at) > tolerance_s


@dataclass
class TelemetryTally:
    """One device's telemetry of one batch, split into newly stored and duplicates."""

    inserted_seqs: list[int] = field(default_factory=list)
    duplicates: int = 0
    newest: Telemetry | None = None  # the inserted window with the highest seq
    max_overflow: int = 0  # highest outbox_overflow reported, duplicates included
    skewed: int = 0  # inserted windows with a skewed clock

    @property
    def inserted(self) -> int:
        return len(self.inserted_seqs)

    @property
    def min_seq(self) -> int | None:
        return min(self.inserted_seqs) if self.inserted_seqs else None

    @property
    def max_seq(self) -> int | None:
        return max(self.inserted_seqs) if self.inserted_seqs else None


def tally_telemetry(
    items: Iterable[TelemetryIn],
    inserted: Collection[tuple[str, int]],
    tolerance_s: float,
) -> dict[str, TelemetryTally]:
    """Count per device what the insert did; inserted holds the (device, seq) keys written.

    The same key twice in one batch was written once: its first occurrence is the insert and
    the others are duplicates, as they would be in separate batches.
    """
    tallies: dict[str, TelemetryTally] = {}
    taken: set[tuple[str, int]] = set()
    for item in items:
        t = item.telemetry
        tally = tallies.setdefault(t.device_id, TelemetryTally())
        tally.max_overflow = max(tally.max_overflow, t.outbox_overflow)
        key = (t.device_id, t.seq)
        if key in inserted and key not in taken:
            taken.add(key)
            tally.inserted_seqs.append(t.seq)
            if tally.newest is None or t.seq > tally.newest.seq:
                tally.newest = t
            if is_clock_skewed(t.window_end, item.received_at, tolerance_s):
                tally.skewed += 1
        else:
            tally.duplicates += 1
    return tallies


def count_inserted(
    keys: Iterable[tuple[str, int]], inserted: Collection[tuple[str, int]]
) -> dict[str, tuple[int, int]]:
    """Per device (inserted, duplicates) for keyed messages such as events."""
    counts: dict[str, tuple[int, int]] = {}
    taken: set[tuple[str, int]] = set()
    for key in keys:
        ins, dup = counts.get(key[0], (0, 0))
        if key in inserted and key not in taken:
            taken.add(key)
            counts[key[0]] = (ins + 1, dup)
        else:
            counts[key[0]] = (ins, dup + 1)
    return counts


def missing(first_seq: int, max_seq: int, received: int) -> int:
    """Seqs between the first and the newest that were never received (lost ones included)."""
    return (max_seq - first_seq + 1) - received


# -- lost ranges ----------------------------------------------------------------------------


def uncovered(gap: SeqRange, covered: Iterable[SeqRange]) -> list[SeqRange]:
    """The parts of gap that no range of covered contains, in order."""
    first, last = gap
    pieces: list[SeqRange] = []
    cursor = first
    for lo, hi in sorted(covered):
        if hi < cursor or lo > last:
            continue
        if lo > cursor:
            pieces.append((cursor, lo - 1))
        cursor = max(cursor, hi + 1)
        if cursor > last:
            break
    if cursor <= last:
        pieces.append((cursor, last))
    return pieces


def remove_seqs(ranges: Iterable[SeqRange], seqs: Iterable[int]) -> tuple[list[SeqRange], int]:
    """Take arrived seqs out of lost ranges; return the remaining ranges and how many left."""
    result = sorted(ranges)
    removed = 0
    for s in sorted(set(seqs)):
        for i, (lo, hi) in enumerate(result):
            if lo <= s <= hi:
                pieces = [p for p in ((lo, s - 1), (s + 1, hi)) if p[0] <= p[1]]
                result[i : i + 1] = pieces
                removed += 1
                break
    return result, removed


def range_size(r: SeqRange) -> int:
    return r[1] - r[0] + 1


def split_oldest(ranges: Iterable[SeqRange], n: int) -> tuple[list[SeqRange], list[SeqRange]]:
    """The n lowest seqs of non-overlapping ranges, and the rest, both as ranges in order.

    Reported drops are attributed this way: the agent's outbox evicts its oldest telemetry
    first, so the windows it dropped are the oldest ones that never came.
    """
    first: list[SeqRange] = []
    rest: list[SeqRange] = []
    left = max(n, 0)
    for lo, hi in sorted(ranges):
        take = min(left, hi - lo + 1)
        if take:
            first.append((lo, lo + take - 1))
            left -= take
        if lo + take <= hi:
            rest.append((lo + take, hi))
    return first, rest


def lost_candidates(tally: TelemetryTally, given_up: int, max_seq_before: int | None) -> list[int]:
    """Inserted seqs that may be in a lost or dropped range: old ones, if any were given up."""
    if given_up <= 0 or max_seq_before is None:
        return []
    return [s for s in tally.inserted_seqs if s <= max_seq_before]


# -- grouping helpers -----------------------------------------------------------------------


def statuses_by_device(statuses: Iterable[StatusIn]) -> dict[str, list[StatusIn]]:
    out: dict[str, list[StatusIn]] = {}
    for s in statuses:
        out.setdefault(s.status.device_id, []).append(s)
    return out


def event_keys(events: Iterable[EventIn]) -> list[tuple[str, int]]:
    return [(e.event.device_id, e.event.seq) for e in events]


def reject_tally(rejects: Iterable[Reject]) -> dict[str, int]:
    """Rejects of a batch by reason."""
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return counts


def merged_counts(stored: Mapping[str, int], known: Iterable[str]) -> dict[str, int]:
    """Every known reason with its count (zero when none), plus any stored unknown reason."""
    out = dict.fromkeys(known, 0)
    out.update(stored)
    return out
