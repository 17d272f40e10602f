"""Decisions both store backends share, kept free of SQL so they are tested once.

The backends read what they need under a lock (a row lock in PostgreSQL, the database write
lock in SQLite), ask these functions what a batch means, and write the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from edgefleet.agent.protocol import Reply, Status, Telemetry
from edgefleet.server.fleet.store.base import (
    CommandRecord,
    DeviceRecord,
    EventIn,
    IngestBatch,
    Reject,
    RollupRecord,
    SequenceReport,
    StatusIn,
    TelemetryIn,
)

# The rejects log is for looking at recent failures; the counters by reason are kept forever.
MAX_REJECT_ROWS = 10_000

SeqRange = tuple[int, int]  # inclusive (first, last)


# -- devices --------------------------------------------------------------------------------


def message_devices(batch: IngestBatch) -> set[str]:
    """Ids of the devices whose messages are in the batch (rejects name no trusted device)."""
    ids = {s.status.device_id for s in batch.statuses}
    ids.update(t.telemetry.device_id for t in batch.telemetry)
    ids.update(e.event.device_id for e in batch.events)
    ids.update(r.reply.device_id for r in batch.replies)
    return ids


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
    ts: float | None


@dataclass(frozen=True)
class DeviceState:
    """What ingest reads of a stored device row (under its lock) before deciding."""

    boot_id: str | None
    status_ts: float | None
    max_seq: int | None
    lost: int

    @property
    def status(self) -> StatusState:
        return StatusState(self.boot_id, self.status_ts)


def status_applies(current: StatusState, incoming: Status) -> bool:
    """Tell whether incoming replaces the stored status.

    Statuses apply in arrival order with two exceptions, both about messages that are late
    rather than new:
    - same boot_id and an older ts: the Will of an earlier session of the same agent process
      (its ts is that session's connect time) arriving after the reconnect's birth. Equal ts
      applies, so the Will of the current session (same ts and boot_id as its birth) wins when
      it arrives after the birth.
    - offline, another boot_id and an older ts: the Will of a replaced agent process arriving
      after its successor's birth (a takeover seen through another coordinator, or a second
      agent with the same id dropping out). Applying it would show a running device offline.
    Births always apply when their boot_id differs: a restarted device may have a worse clock.
    """
    if current.boot_id is None or current.ts is None:
        return True
    if incoming.boot_id == current.boot_id:
        return incoming.ts >= current.ts
    return incoming.online or incoming.ts >= current.ts


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


def fold_statuses(
    current: StatusState, seen_boots: AbstractSet[str], statuses: Sequence[StatusIn]
) -> StatusFold:
    """Apply one device's statuses in arrival order (see status_applies, is_id_conflict)."""
    state = current
    seen = set(seen_boots)
    applied: Status | None = None
    group: str | None = None
    conflicts = 0
    boots: dict[str, tuple[float, float]] = {}
    for item in statuses:
        s = item.status
        if is_id_conflict(state, seen, s):
            conflicts += 1
        if status_applies(state, s):
            applied = s
            state = StatusState(s.boot_id, s.ts)
            # A status without a group leaves the operator's assignment alone.
            if s.group is not None:
                group = s.group
        seen.add(s.boot_id)
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


# -- rollups --------------------------------------------------------------------------------


def bucket_start(received_at: float, bucket_s: float) -> float:
    """The bucket a window falls into, by the coordinator's clock (never the device's)."""
    return math.floor(received_at / bucket_s) * bucket_s


@dataclass
class RollupSums:
    """The additive state of a rollup row: sums and maxima, so buckets merge by adding."""

    windows: int = 0
    frames_processed: int = 0
    fps_sum: float = 0.0
    p95_max: float = 0.0
    power_sum: float = 0.0
    power_n: int = 0
    energy_j: float = 0.0

    def add(self, t: Telemetry) -> None:
        """Fold one raw window in."""
        self.windows += 1
        self.frames_processed += t.frames_processed
        self.fps_sum += t.fps
        self.p95_max = max(self.p95_max, t.latency_ms.p95)
        if t.power_w is not None:
            self.power_sum += t.power_w
            self.power_n += 1
            self.energy_j += t.power_w * (t.window_end - t.window_start)

    def record(self, device_id: str, start: float) -> RollupRecord:
        return rollup_record(
            device_id,
            start,
            windows=self.windows,
            frames_processed=self.frames_processed,
            fps_sum=self.fps_sum,
            p95_max=self.p95_max,
            power_sum=self.power_sum,
            power_n=self.power_n,
            energy_j=self.energy_j,
        )


def rollup_record(
    device_id: str,
    start: float,
    *,
    windows: int,
    frames_processed: int,
    fps_sum: float,
    p95_max: float,
    power_sum: float,
    power_n: int,
    energy_j: float,
) -> RollupRecord:
    """Turn stored sums into means; power and energy are None when no window knew its power."""
    return RollupRecord(
        device_id=device_id,
        bucket_start=start,
        windows=windows,
        frames_processed=frames_processed,
        fps_mean=fps_sum / windows if windows else 0.0,
        p95_ms_max=p95_max,
        power_w_mean=power_sum / power_n if power_n else None,
        energy_j=energy_j if power_n else None,
    )


def rollup_windows(
    items: Iterable[TelemetryIn], bucket_s: float
) -> dict[tuple[str, float], RollupSums]:
    """Reference aggregation of raw windows by (device, bucket); the backends do it in SQL."""
    sums: dict[tuple[str, float], RollupSums] = {}
    for item in items:
        key = (item.telemetry.device_id, bucket_start(item.received_at, bucket_s))
        sums.setdefault(key, RollupSums()).add(item.telemetry)
    return sums


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


# -- the per-device write of one batch ------------------------------------------------------


@dataclass(frozen=True)
class DeviceDelta:
    """What one batch changes on a device row; both backends write it in one UPDATE.

    Counters are increments and sequence bounds are min/max merges, so the write stays right
    even if another writer changed the row in between (PostgreSQL also holds the row lock).
    """

    device_id: str
    first_seen: float
    last_seen: float
    status: Status | None  # the status to store; None leaves online/boot/status alone
    group: str | None  # None leaves the group alone
    id_conflicts: int
    first_seq: int | None  # lowest seq inserted by the batch
    max_seq: int | None
    received: int
    duplicates: int
    unlost: int  # lost seqs that arrived after all
    overflow: int | None  # highest outbox_overflow reported; None without telemetry
    newest: Telemetry | None  # the inserted window with the highest seq

    def params(self, json_of: JsonOf | None = None) -> dict[str, object]:
        """Named parameters for the backends' UPDATE statements."""
        dump = json_of or _dump
        return {
            "device_id": self.device_id,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "online": None if self.status is None else self.status.online,
            "status_json": None if self.status is None else self.status.model_dump_json(),
            "status_ts": None if self.status is None else self.status.ts,
            "boot_id": None if self.status is None else self.status.boot_id,
            "device_group": self.group,
            "id_conflicts": self.id_conflicts,
            "first_seq": self.first_seq,
            "max_seq": self.max_seq,
            "received": self.received,
            "duplicates": self.duplicates,
            "unlost": self.unlost,
            "overflow": self.overflow,
            "newest_seq": None if self.newest is None else self.newest.seq,
            "newest_json": None if self.newest is None else dump(self.newest),
        }


JsonOf = Callable[[Telemetry], str]


def _dump(t: Telemetry) -> str:
    return t.model_dump_json()


class TelemetryJson:
    """JSON of the batch's windows: the received text where there is one, else serialized."""

    def __init__(self, items: Iterable[TelemetryIn]) -> None:
        # By identity: the models live as long as the batch, and equal windows may differ in
        # their received text only by formatting.
        self._raw = {id(i.telemetry): i.raw for i in items if i.raw is not None}

    def __call__(self, t: Telemetry) -> str:
        raw = self._raw.get(id(t))
        return raw if raw is not None else t.model_dump_json()


def device_deltas(
    span: Mapping[str, tuple[float, float]],
    known: AbstractSet[str],
    folds: Mapping[str, StatusFold],
    tallies: Mapping[str, TelemetryTally],
    unlost: Mapping[str, int],
) -> list[DeviceDelta]:
    """One delta per known device of the batch, sorted by id (the backends' lock order)."""
    out: list[DeviceDelta] = []
    for device_id in sorted(d for d in span if d in known):
        lo, hi = span[device_id]
        fold = folds.get(device_id)
        tally = tallies.get(device_id)
        out.append(
            DeviceDelta(
                device_id=device_id,
                first_seen=lo,
                last_seen=hi,
                status=None if fold is None else fold.applied,
                group=None if fold is None else fold.group,
                id_conflicts=0 if fold is None else fold.conflicts,
                first_seq=None if tally is None else tally.min_seq,
                max_seq=None if tally is None else tally.max_seq,
                received=0 if tally is None else tally.inserted,
                duplicates=0 if tally is None else tally.duplicates,
                unlost=unlost.get(device_id, 0),
                overflow=None if tally is None else tally.max_overflow,
                newest=None if tally is None else tally.newest,
            )
        )
    return out


def lost_candidates(tally: TelemetryTally, lost: int, max_seq_before: int | None) -> list[int]:
    """Inserted seqs that may be in a lost range: only old ones, only if anything is lost."""
    if lost <= 0 or max_seq_before is None:
        return []
    return [s for s in tally.inserted_seqs if s <= max_seq_before]


# -- reading --------------------------------------------------------------------------------

# Column order of device rows as both backends select them for device_record().
DEVICE_COLUMNS = (
    "device_id, device_group, online, registered_at, first_seen, last_seen, status_json, "
    "last_telemetry_json, id_conflicts"
)


def device_record(row: Sequence[object]) -> DeviceRecord:
    """A DeviceRecord from a row selected with DEVICE_COLUMNS.

    A pre-registered device that never spoke reports its registration time as first and
    last seen: the record has no "never", and that is when the coordinator learnt of it.
    """
    (
        device_id,
        group,
        online,
        registered_at,
        first_seen,
        last_seen,
        status_json,
        telemetry_json,
        conflicts,
    ) = row
    registered = _float(registered_at)
    return DeviceRecord(
        device_id=str(device_id),
        group=None if group is None else str(group),
        online=bool(online),
        first_seen=registered if first_seen is None else _float(first_seen),
        last_seen=registered if last_seen is None else _float(last_seen),
        status=None if status_json is None else Status.model_validate_json(str(status_json)),
        last_telemetry=(
            None if telemetry_json is None else Telemetry.model_validate_json(str(telemetry_json))
        ),
        id_conflicts=_int(conflicts),
    )


SEQUENCE_COLUMNS = "device_id, first_seq, max_seq, received, duplicates, lost, reported_overflow"


def sequence_report(row: Sequence[object]) -> SequenceReport:
    """A SequenceReport from a row selected with SEQUENCE_COLUMNS."""
    device_id, first_seq, max_seq, received, duplicates, lost, overflow = row
    first, top, got = _int(first_seq), _int(max_seq), _int(received)
    return SequenceReport(
        device_id=str(device_id),
        first_seq=first,
        max_seq=top,
        received=got,
        duplicates=_int(duplicates),
        missing=missing(first, top, got),
        lost=_int(lost),
        reported_overflow=_int(overflow),
    )


ROLLUP_COLUMNS = (
    "device_id, bucket_start, windows, frames_processed, fps_sum, p95_max, power_sum, "
    "power_n, energy_j"
)


def rollup_from_row(row: Sequence[object]) -> RollupRecord:
    """A RollupRecord from a row selected with ROLLUP_COLUMNS."""
    device_id, start, windows, frames, fps_sum, p95_max, power_sum, power_n, energy = row
    return rollup_record(
        str(device_id),
        _float(start),
        windows=_int(windows),
        frames_processed=_int(frames),
        fps_sum=_float(fps_sum),
        p95_max=_float(p95_max),
        power_sum=_float(power_sum),
        power_n=_int(power_n),
        energy_j=_float(energy),
    )


def command_record(row: Sequence[object], replies: Sequence[Reply]) -> CommandRecord:
    """A CommandRecord from (command_id, target, name, body_json, sent_at) and its replies."""
    command_id, target, name, body_json, sent_at = row
    return CommandRecord(
        command_id=str(command_id),
        target=str(target),
        name=str(name),
        body_json=str(body_json),
        sent_at=_float(sent_at),
        replies=tuple(replies),
    )


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer column, got {value!r}")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number column, got {value!r}")
    return float(value)
