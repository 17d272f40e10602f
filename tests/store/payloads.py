"""Messages and records for the store tests: valid payloads with chosen fields."""

from __future__ import annotations

from typing import Any

from edgefleet.agent.protocol import (
    Event,
    Hardware,
    Percentiles,
    Reply,
    Status,
    Telemetry,
    offline_will,
)
from edgefleet.server.fleet.store import (
    CommandRecord,
    EventIn,
    Reject,
    ReplyIn,
    StatusIn,
    TelemetryIn,
)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400.0
BOOT_A = "3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b"
BOOT_B = "5d2e3f4a-1b2c-4d3e-8f4a-5b6c7d8e9f00"
BOOT_C = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"


def telemetry(
    device_id: str,
    seq: int,
    received_at: float,
    *,
    power_w: float | None = 6.4,
    overflow: int = 0,
    skew_s: float = 0.0,
    length_s: float = 10.0,
) -> TelemetryIn:
    """A valid window that ended one second before it was received (plus skew_s)."""
    end = received_at - 1.0 + skew_s
    frames = 200 + seq % 50
    return TelemetryIn(
        received_at=received_at,
        telemetry=Telemetry(
            device_id=device_id,
            seq=seq,
            window_start=end - length_s,
            window_end=end,
            frames_captured=frames + 3,
            frames_processed=frames,
            frames_dropped=3,
            fps=frames / length_s,
            latency_ms=Percentiles(p50=4.0, p95=8.0 + seq % 7, p99=20.0),
            stage_latency_ms=[Percentiles(p50=2.0, p95=2.4, p99=2.9)],
            exit_histogram=[frames - 40, 40],
            operating_point=1,
            cpu_percent=150.0,
            rss_mb=140.0,
            temperature_c=55.0,
            throttled=False,
            power_w=power_w,
            power_source="pmic" if power_w is not None else "none",
            energy_per_frame_mj=None,
            outbox_depth=0,
            outbox_overflow=overflow,
            model_id="digits-ee",
            model_version=3,
        ),
    )


def status(
    device_id: str,
    boot_id: str,
    ts: float,
    received_at: float,
    *,
    online: bool = True,
    group: str | None = "lab-a",
    operating_point: int = 1,
) -> StatusIn:
    """A birth (or with online=False, a Will) of one agent process."""
    birth = Status(
        device_id=device_id,
        online=True,
        ts=ts,
        agent_version="0.1.0",
        model_id="digits-ee",
        model_version=3,
        operating_point=operating_point,
        group=group,
        hardware=Hardware(machine="aarch64", system="Linux", cpu_count=4, ram_mb=8064.0),
        boot_id=boot_id,
    )
    return StatusIn(received_at=received_at, status=birth if online else offline_will(birth))


def event(device_id: str, seq: int, received_at: float) -> EventIn:
    return EventIn(
        received_at=received_at,
        event=Event(
            device_id=device_id,
            ts=received_at - 0.5,
            seq=seq,
            kind="operating_point_changed",
            message=f"operating point {seq % 3}",
            details={"to": seq % 3},
        ),
    )


def reply(command_id: str, device_id: str, received_at: float) -> ReplyIn:
    return ReplyIn(
        received_at=received_at,
        reply=Reply(id=command_id, device_id=device_id, ts=received_at - 0.1, ok=True),
    )


def command(command_id: str, sent_at: float, target: str = "group/lab-a") -> CommandRecord:
    return CommandRecord(
        command_id=command_id,
        target=target,
        name="ping",
        body_json=f'{{"id":"{command_id}","ts":{sent_at},"command":{{"name":"ping"}}}}',
        sent_at=sent_at,
        replies=(),
    )


def reject(received_at: float, reason: Any = "invalid_payload") -> Reject:
    return Reject(
        received_at=received_at,
        topic="edgefleet/v1/dev/pi-1/telemetry",
        device_id="pi-1",
        reason=reason,
        detail="field 'seq': Input should be greater than or equal to 0",
    )
