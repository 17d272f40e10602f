"""What the HTTP API and the CLI show: pydantic views built from store records."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.protocol import Event, Reply, Telemetry
from edgefleet.agent.protocol.commands import AnyCommand
from edgefleet.agent.protocol.ids import DeviceId, GroupName
from edgefleet.server.fleet.store.base import (
    DeviceRecord,
    EventRecord,
    SequenceReport,
    TelemetryRecord,
)


class View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceView(View):
    """One row of `fleet ls`."""

    device_id: str
    group: str | None
    online: bool
    model_id: str | None
    model_version: int | None
    operating_point: int | None
    agent_version: str | None
    fps: float | None
    p95_ms: float | None
    power_w: float | None
    power_source: str | None
    energy_per_frame_mj: float | None
    temperature_c: float | None
    first_seen: float
    last_seen: float
    id_conflicts: int
    bundle_sha256: str | None = Field(
        None, description="Manifest sha256 of the bundle the device reported running."
    )

    @classmethod
    def of(cls, rec: DeviceRecord) -> DeviceView:
        st, tm = rec.status, rec.last_telemetry
        return cls(
            device_id=rec.device_id,
            group=rec.group,
            online=rec.online,
            model_id=(tm.model_id if tm and tm.model_id else st.model_id if st else None),
            model_version=(
                tm.model_version if tm and tm.model_version else st.model_version if st else None
            ),
            operating_point=tm.operating_point if tm else st.operating_point if st else None,
            agent_version=st.agent_version if st else None,
            fps=tm.fps if tm else None,
            p95_ms=tm.latency_ms.p95 if tm else None,
            power_w=tm.power_w if tm else None,
            power_source=tm.power_source if tm else None,
            energy_per_frame_mj=tm.energy_per_frame_mj if tm else None,
            temperature_c=tm.temperature_c if tm else None,
            first_seen=rec.first_seen,
            last_seen=rec.last_seen,
            id_conflicts=rec.id_conflicts,
            bundle_sha256=st.bundle_sha256 if st else None,
        )


class SequenceView(View):
    """Sequence accounting of one device: what arrived, what is missing, dropped or lost.

    Of the missing seqs, dropped ones were reported dropped by the device's full outbox and
    lost ones vanished without a word; the rest are still pending.
    """

    first_seq: int
    max_seq: int
    received: int
    duplicates: int
    missing: int
    lost: int
    dropped: int
    reported_overflow: int

    @classmethod
    def of(cls, rep: SequenceReport) -> SequenceView:
        fields = dataclasses.asdict(rep)
        del fields["device_id"]  # the view sits under its device
        return cls(**fields)


class WindowView(View):
    seq: int
    received_at: float
    telemetry: Telemetry

    @classmethod
    def of(cls, rec: TelemetryRecord) -> WindowView:
        return cls(seq=rec.seq, received_at=rec.received_at, telemetry=rec.telemetry)


class EventView(View):
    device_id: str
    seq: int
    received_at: float
    event: Event

    @classmethod
    def of(cls, rec: EventRecord) -> EventView:
        return cls(
            device_id=rec.device_id, seq=rec.seq, received_at=rec.received_at, event=rec.event
        )


OBJECT_KINDS = ("object_start", "object_update", "object_end")


class ObjectEventView(View):
    """One object event of a detector, its details as columns (`fleet show`'s objects)."""

    seq: int
    ts: float
    kind: str
    label: str | None
    track_id: int | None
    start_ts: float | None
    duration_s: float | None
    frames: int | None
    score: float | None
    box: tuple[float, float, float, float] | None
    zone: str | None

    @classmethod
    def of(cls, ev: Event) -> ObjectEventView:
        d = ev.details

        def num(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        def whole(key: str) -> int | None:
            v = d.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        def text(key: str) -> str | None:
            v = d.get(key)
            return v if isinstance(v, str) else None

        corners = [num(k) for k in ("x1", "y1", "x2", "y2")]
        box = None
        if all(c is not None for c in corners):
            x1, y1, x2, y2 = (float(c or 0.0) for c in corners)
            box = (x1, y1, x2, y2)
        return cls(
            seq=ev.seq,
            ts=ev.ts,
            kind=ev.kind,
            label=text("label"),
            track_id=whole("track_id"),
            start_ts=num("start_ts"),
            duration_s=num("duration_s"),
            frames=whole("frames"),
            score=num("score"),
            box=box,
            zone=text("zone"),
        )


def object_events(events: list[EventView]) -> list[ObjectEventView]:
    """The detector object events among a device's recent events, in their order."""
    return [ObjectEventView.of(e.event) for e in events if e.event.kind in OBJECT_KINDS]


class DeviceDetail(View):
    """`fleet show DEVICE`: the device, its recent windows and events, its sequence account."""

    device: DeviceView
    sequence: SequenceView | None
    windows: list[WindowView]
    events: list[EventView]


class GroupView(View):
    group: str
    devices: int


class CommandRequest(View):
    """Body of POST .../commands."""

    command: AnyCommand
    timeout_s: float = Field(5.0, ge=0, le=120, description="How long to wait for replies.")
    expires_s: float | None = Field(
        60.0, ge=1, le=86_400, description="Devices ignore the command after this long."
    )


class CommandOutcome(View):
    """Replies that came within the timeout, and who stayed silent."""

    command_id: str
    target: str
    replies: list[Reply]
    missing: list[str]


class GroupAssignment(View):
    group: GroupName | None = Field(
        description="New group, or null to remove the device from its group."
    )


class Registration(View):
    """Body of POST /devices: admit a device before it first speaks (closed registration)."""

    device_id: DeviceId
    group: GroupName | None = None
