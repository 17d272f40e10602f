"""One valid sample of every payload; docs/protocol.md's examples were generated from these."""

from __future__ import annotations

import base64

import numpy as np

from edgefleet.agent.protocol import (
    AnyCommand,
    BundleOffer,
    Command,
    DeltaRef,
    EncodedTensor,
    Event,
    FedTask,
    FedUpdate,
    Hardware,
    InstallBundle,
    Payload,
    Percentiles,
    Ping,
    PrivacySpec,
    ReloadBundle,
    Reply,
    Result,
    RollbackBundle,
    SetOperatingPoint,
    SetTelemetryInterval,
    SetThresholds,
    Snapshot,
    Status,
    Telemetry,
    UnpinOperatingPoint,
    offline_will,
)
from edgefleet.agent.protocol.messages import DetectedObject

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
MANIFEST_SHA = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
BASE_MANIFEST_SHA = "fd61a03af4f77d870fc21e05e7e80678095c92d808cfb3b5c279ee04c74aca13"
DELTA_SHA = "a4e624d686e03ed2767c0abd85c14426b0b1157d2ce81d27bb4fe4f6f01d688a"


def status(device_id: str = "pi-7", online: bool = True) -> Status:
    """A Raspberry Pi's birth message."""
    return Status(
        device_id=device_id,
        online=online,
        ts=1_767_225_600.25,
        agent_version="0.1.0",
        model_id="digits-ee",
        model_version=3,
        operating_point=1,
        group="lab-a",
        hardware=Hardware(
            machine="aarch64",
            system="Linux",
            cpu_count=4,
            ram_mb=8064.0,
            accelerators=[],
            device_model="Raspberry Pi 5 Model B Rev 1.0",
        ),
        boot_id="3f1c2a4e-7b5d-4e8f-9a0b-1c2d3e4f5a6b",
    )


def telemetry(device_id: str = "pi-7", seq: int = 42) -> Telemetry:
    """A busy window of a three-stage model."""
    return Telemetry(
        device_id=device_id,
        seq=seq,
        window_start=1_767_225_600.0,
        window_end=1_767_225_610.0,
        frames_captured=300,
        frames_processed=288,
        frames_dropped=12,
        fps=28.8,
        latency_ms=Percentiles(p50=4.1, p95=9.8, p99=12.5),
        stage_latency_ms=[
            Percentiles(p50=2.0, p95=2.4, p99=2.9),
            Percentiles(p50=3.1, p95=3.6, p99=4.0),
            Percentiles(p50=3.9, p95=4.4, p99=5.2),
        ],
        exit_histogram=[190, 71, 27],
        operating_point=1,
        cpu_percent=187.5,
        rss_mb=142.3,
        temperature_c=61.2,
        throttled=False,
        power_w=6.4,
        power_source="pmic",
        energy_per_frame_mj=222.2,
        outbox_depth=0,
        outbox_overflow=0,
        model_id="digits-ee",
        model_version=3,
    )


def result() -> Result:
    """A digit recognised at the first exit."""
    return Result(
        device_id="pi-7",
        ts=1_767_225_601.5,
        frame_index=1234,
        class_index=7,
        label="7",
        confidence=0.97,
        exit_index=0,
        latency_ms=2.3,
    )


def detect_telemetry(device_id: str = "cam-3", seq: int = 9) -> Telemetry:
    """A detector's window: one exit bucket, frames the motion gate skipped, objects seen."""
    return Telemetry(
        device_id=device_id,
        seq=seq,
        window_start=1_767_225_600.0,
        window_end=1_767_225_610.0,
        frames_captured=300,
        frames_processed=120,
        frames_dropped=0,
        fps=12.0,
        latency_ms=Percentiles(p50=21.0, p95=24.5, p99=26.0),
        stage_latency_ms=[Percentiles(p50=20.5, p95=24.0, p99=25.5)],
        exit_histogram=[120],
        operating_point=1,
        cpu_percent=95.0,
        rss_mb=180.2,
        power_source="none",
        outbox_depth=0,
        outbox_overflow=0,
        model_id="digits-det",
        model_version=2,
        object_counts={"3": 1, "7": 2},
        frames_skipped=180,
        objects_started=4,
    )


def detect_result() -> Result:
    """A detector's frame with two boxes, the best first; the top fields are the best box's."""
    return Result(
        device_id="cam-3",
        ts=1_767_225_601.5,
        frame_index=4321,
        class_index=7,
        label="7",
        confidence=0.91,
        exit_index=0,
        latency_ms=22.4,
        objects=[
            DetectedObject(
                class_index=7,
                label="7",
                score=0.91,
                x1=40.0,
                y1=32.5,
                x2=96.0,
                y2=90.0,
                track_id=12,
            ),
            DetectedObject(
                class_index=3,
                label="3",
                score=0.55,
                x1=200.0,
                y1=10.0,
                x2=250.5,
                y2=64.0,
                track_id=None,
            ),
        ],
    )


def object_event() -> Event:
    """A tracked object that left the view after 3.2 s."""
    return Event(
        device_id="cam-3",
        ts=1_767_225_704.2,
        seq=31,
        kind="object_end",
        message="7 #12 left after 3.2 s (48 frames)",
        details={
            "track_id": 12,
            "class_index": 7,
            "label": "7",
            "score": 0.93,
            "x1": 180.0,
            "y1": 30.0,
            "x2": 236.0,
            "y2": 88.0,
            "duration_s": 3.2,
            "frames": 48,
            "start_ts": 1_767_225_701.0,
            "zone": "door",
        },
    )


def event() -> Event:
    """A rollback after a failed health check."""
    return Event(
        device_id="pi-7",
        ts=1_767_225_700.0,
        seq=17,
        kind="rollback",
        level="warning",
        message="bundle digits-ee v4 failed its health check; back on v3",
        details={"from_version": 4, "to_version": 3, "p95_ms": 31.5, "healthy": False, "x": None},
    )


COMMAND_BODIES: list[AnyCommand] = [
    Ping(),
    SetOperatingPoint(index=2, pin=True),
    UnpinOperatingPoint(),
    SetThresholds(thresholds=[0.9, None, 0.75]),
    SetTelemetryInterval(seconds=30),
    Snapshot(quality=70),
    ReloadBundle(),
    InstallBundle(
        sha256=SHA,
        model_id="digits-ee",
        version=4,
        manifest_sha256=MANIFEST_SHA,
        delta=DeltaRef(sha256=DELTA_SHA, base_manifest_sha256=BASE_MANIFEST_SHA),
        rollout_id="r-20261202-1",
    ),
    RollbackBundle(
        manifest_sha256=MANIFEST_SHA, rollout_id="r-20261202-1", reason="halt rule p95_ms>40"
    ),
]


def command(body: AnyCommand | None = None) -> Command:
    """A command envelope around body (default: a ping)."""
    return Command(
        id="c-5b2e0f1a",
        ts=1_767_225_800.0,
        expires_at=1_767_225_860.0,
        command=body if body is not None else Ping(),
    )


def reply(ok: bool = True) -> Reply:
    """A device's answer to a snapshot, or a refusal."""
    if ok:
        return Reply(
            id="c-5b2e0f1a",
            device_id="pi-7",
            ts=1_767_225_800.4,
            ok=True,
            result={"jpeg_b64": "/9j/4AAQSkZJRg==", "width": 64, "height": 64},
        )
    return Reply(
        id="c-5b2e0f1a", device_id="pi-7", ts=1_767_225_800.4, ok=False, error="no such exit 5"
    )


def offer() -> BundleOffer:
    """A 600 KiB archive in three 256 KiB chunks."""
    return BundleOffer(
        sha256=SHA,
        model_id="digits-ee",
        version=4,
        manifest_sha256=MANIFEST_SHA,
        size=600 * 1024,
        chunk_size=256 * 1024,
        chunk_sha256=[f"{i:x}" * 64 for i in (10, 11, 12)],
        created_ts=1_767_225_750.0,
    )


def fed_task() -> FedTask:
    """Round r-12: train exit 0 of digits-ee v4 on pseudo labels, fp16 deltas, with DP."""
    return FedTask(
        round_id="r-12",
        model_id="digits-ee",
        base_manifest_sha256=MANIFEST_SHA,
        base_version=4,
        group="lab-a",
        heads=[0],
        labels="pseudo",
        min_confidence=0.9,
        min_samples=64,
        local_epochs=3,
        learning_rate=0.05,
        batch_size=32,
        cpu_budget_s=30.0,
        privacy=PrivacySpec(clip=2.0, noise_multiplier=0.01),
        compression="fp16",
        deadline_ts=1_767_226_400.0,
        created_ts=1_767_225_800.0,
    )


def fed_update() -> FedUpdate:
    """pi-7's delta for exit 0 (3 classes on 2 features, to keep the example short)."""
    weight = [0.01, -0.02, 0.0, 0.03, 0.005, -0.01]
    bias = [0.001, 0.0, -0.001]
    return FedUpdate(
        round_id="r-12",
        device_id="pi-7",
        model_id="digits-ee",
        base_manifest_sha256=MANIFEST_SHA,
        base_version=4,
        samples=412,
        val_samples=103,
        tensors=[
            EncodedTensor(
                name="exit0.weight",
                shape=[3, 2],
                scheme="fp16",
                data=base64.b64encode(np.asarray(weight, "<f2").tobytes()).decode(),
            ),
            EncodedTensor(
                name="exit0.bias",
                shape=[3],
                scheme="fp16",
                data=base64.b64encode(np.asarray(bias, "<f2").tobytes()).decode(),
            ),
        ],
        train_loss=0.41,
        val_accuracy_before=0.83,
        val_accuracy_after=0.9,
        val_exit_rate_before=0.55,
        val_exit_rate_after=0.68,
        norm=0.041,
        clipped=False,
        noise_multiplier=0.01,
        epochs_done=3,
        cpu_s=4.2,
        raw_bytes=36,
        encoded_bytes=18,
        ts=1_767_225_990.0,
    )


ALL_MESSAGES: list[Payload] = [
    status(),
    offline_will(status()),
    telemetry(),
    result(),
    event(),
    detect_telemetry(),
    detect_result(),
    object_event(),
    *(command(body) for body in COMMAND_BODIES),
    reply(ok=True),
    reply(ok=False),
    offer(),
    fed_task(),
    fed_update(),
]
