"""What one ingested batch changes on each device row, kept free of SQL.

Every backend writes a DeviceDelta in one UPDATE. Counters are increments and sequence bounds
are min/max merges, so the write stays right even if another writer changed the row in
between (PostgreSQL also holds the row lock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from edgefleet.agent.protocol import Status, Telemetry
from edgefleet.server.fleet.store.base import TelemetryIn
from edgefleet.server.fleet.store.logic import StatusFold, TelemetryTally


@dataclass(frozen=True)
class DeviceDelta:
    """What one batch changes on a device row."""

    device_id: str
    first_seen: float
    last_seen: float
    status: Status | None  # the status to store; None leaves online/boot/status alone
    status_received_at: float | None  # when that status came (how statuses are ordered)
    group: str | None  # None leaves the group alone
    id_conflicts: int
    first_seq: int | None  # lowest seq inserted by the batch
    max_seq: int | None
    received: int
    duplicates: int
    unlost: int  # lost seqs that arrived after all
    undropped: int  # seqs taken for reported drops that arrived after all
    overflow: int | None  # highest outbox_overflow reported; None without telemetry
    newest: Telemetry | None  # the inserted window with the highest seq

    def params(self, json_of: JsonOf | None = None) -> dict[str, object]:
        """Named parameters for the backends' UPDATE statements (Sql.update_devices)."""
        dump = json_of or _dump
        return {
            "device_id": self.device_id,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "online": None if self.status is None else self.status.online,
            "status_json": None if self.status is None else self.status.model_dump_json(),
            "status_ts": None if self.status is None else self.status.ts,
            "boot_id": None if self.status is None else self.status.boot_id,
            "status_received_at": self.status_received_at,
            "device_group": self.group,
            "id_conflicts": self.id_conflicts,
            "first_seq": self.first_seq,
            "max_seq": self.max_seq,
            "received": self.received,
            "duplicates": self.duplicates,
            "unlost": self.unlost,
            "undropped": self.undropped,
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
    unlost: Mapping[str, tuple[int, int]],
) -> list[DeviceDelta]:
    """One delta per known device of the batch, sorted by id (the backends' lock order).

    unlost holds per device (lost, dropped) seqs that arrived after all.
    """
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
                status_received_at=None if fold is None else fold.applied_at,
                group=None if fold is None else fold.group,
                id_conflicts=0 if fold is None else fold.conflicts,
                first_seq=None if tally is None else tally.min_seq,
                max_seq=None if tally is None else tally.max_seq,
                received=0 if tally is None else tally.inserted,
                duplicates=0 if tally is None else tally.duplicates,
                unlost=unlost.get(device_id, (0, 0))[0],
                undropped=unlost.get(device_id, (0, 0))[1],
                overflow=None if tally is None else tally.max_overflow,
                newest=None if tally is None else tally.newest,
            )
        )
    return out
