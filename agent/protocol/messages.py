"""Device -> coordinator payloads: status, telemetry, results and events."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from edgefleet.agent.protocol.base import ModelId, Payload, PayloadKind, Strict
from edgefleet.agent.protocol.bounds import (
    MAX_COUNT,
    MAX_FPS,
    MAX_MJ,
    MAX_MS,
    MAX_SEQ,
    MAX_TS,
    Int64,
)
from edgefleet.agent.protocol.ids import DeviceId, GroupName, Sha256Hex

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64)]
DetailValue = Annotated[str, StringConstraints(max_length=1000)] | Int64 | float | bool | None

MAX_EXITS = 16
MAX_STAGES = 16
# Boxes in one result. A Result at every bound (50 objects with 64-character labels and
# 18-digit coordinates) encodes to about 14 KB, inside the 16 KiB results limit (tested).
MAX_OBJECTS = 50
# Classes counted in one telemetry window.
MAX_COUNTED_CLASSES = 100
# Frame coordinates: a camera frame is at most 8192 pixels wide (camera.width's bound).
MAX_PX = 100_000.0
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _OmitNone(Strict):
    """A payload whose fields in OMIT_IF_NONE are left off the wire when None.

    Fields added for detectors are optional; leaving them out when unset keeps a classifier's
    payloads byte-for-byte what they were, so a coordinator that predates them (extra keys
    forbidden) still reads every payload of a classifier device.
    """

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self.OMIT_IF_NONE:
            if name in data and data[name] is None:
                del data[name]
        return data


class Hardware(Strict):
    """What the device is, reported once per boot in its status."""

    machine: ShortText = Field(description="CPU architecture, e.g. 'aarch64' or 'x86_64'.")
    system: ShortText = Field(description="Operating system, e.g. 'Linux'.")
    cpu_count: int = Field(ge=1, le=1024, description="Logical CPUs.")
    ram_mb: float = Field(ge=0, le=16_777_216, description="Total memory in MiB.")
    accelerators: list[ShortText] = Field(
        default_factory=list,
        max_length=16,
        description="onnxruntime providers besides the CPU, e.g. 'CUDAExecutionProvider'.",
    )
    device_model: str | None = Field(
        None, max_length=128, description="Board name, e.g. 'Raspberry Pi 5 Model B Rev 1.0'."
    )
    # Optional so that statuses of agents that predate it still validate; the coordinator
    # then derives the class from machine and device_model (without the CPU flags).
    device_class: ShortText | None = Field(
        None,
        description="Class whose devices run a model at about the same speed: 'rpi5', "
        "'jetson-orin-nano', 'x86-avx512' (agent/hardware.py classify_device).",
    )


class Status(Payload):
    """Birth message, retained; the Last Will is the same with online=False."""

    KIND: ClassVar[PayloadKind] = "status"

    device_id: DeviceId = Field(description="The device; equals the id in the topic.")
    online: bool = Field(description="False in the Last Will and on clean shutdown.")
    ts: float = Field(ge=0, le=MAX_TS, description="Unix seconds when this status was made.")
    agent_version: ShortText = Field(description="Version of the edgefleet agent.")
    model_id: ModelId | None = Field(None, description="Installed model, None before any install.")
    model_version: int | None = Field(
        None, ge=1, le=MAX_SEQ, description="Installed bundle version."
    )
    operating_point: int | None = Field(
        None, ge=0, le=255, description="Index of the active operating point."
    )
    group: GroupName | None = Field(None, description="Group whose commands the device obeys.")
    hardware: Hardware = Field(description="What the device is.")
    boot_id: str = Field(
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="UUID made at each agent start; a new one means the agent restarted.",
    )
    bundle_sha256: Sha256Hex | None = Field(
        None, description="sha256 of the running bundle's manifest.json: exactly what runs."
    )
    previous_bundle_sha256: Sha256Hex | None = Field(
        None, description="Manifest sha256 of the bundle a rollback would go back to."
    )


def offline_will(birth: Status) -> Status:
    """The Last Will for a session: its birth message with online=False."""
    # Keeping model and hardware in the retained offline status lets the registry show what
    # a dead device last ran; ts stays the connect time because the broker sends stored bytes.
    return birth.model_copy(update={"online": False})


class Percentiles(Strict):
    """Latency percentiles of one window, in milliseconds."""

    p50: float = Field(ge=0, le=MAX_MS, description="Median.")
    p95: float = Field(ge=0, le=MAX_MS, description="95th percentile.")
    p99: float = Field(ge=0, le=MAX_MS, description="99th percentile.")

    @model_validator(mode="after")
    def _ordered(self) -> Percentiles:
        if not self.p50 <= self.p95 <= self.p99:
            raise ValueError(
                f"percentiles must satisfy p50 <= p95 <= p99, got "
                f"p50={self.p50}, p95={self.p95}, p99={self.p99}"
            )
        return self


PowerSource = Literal["rapl", "hwmon", "ina3221", "pmic", "estimate", "none"]


class Telemetry(Payload, _OmitNone):
    """One window of measurements; seq lets the coordinator prove nothing was lost."""

    KIND: ClassVar[PayloadKind] = "telemetry"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset(
        {"object_counts", "frames_skipped", "objects_started"}
    )

    device_id: DeviceId = Field(description="The device; equals the id in the topic.")
    seq: int = Field(
        ge=0,
        le=MAX_SEQ,
        description="Per-device window number, persisted across restarts, never reused.",
    )
    window_start: float = Field(ge=0, le=MAX_TS, description="Unix seconds when the window began.")
    window_end: float = Field(ge=0, le=MAX_TS, description="Unix seconds when the window ended.")
    frames_captured: int = Field(ge=0, le=MAX_COUNT, description="Frames read from the camera.")
    frames_processed: int = Field(
        ge=0, le=MAX_COUNT, description="Frames that went through the model."
    )
    frames_dropped: int = Field(
        ge=0, le=MAX_COUNT, description="Frames skipped because inference was busy."
    )
    fps: float = Field(ge=0, le=MAX_FPS, description="Processed frames per second over the window.")
    latency_ms: Percentiles = Field(description="End-to-end inference latency; 0 if no frames.")
    stage_latency_ms: list[Percentiles] = Field(
        default_factory=list, max_length=MAX_STAGES, description="Latency of each stage in order."
    )
    exit_histogram: list[Count] = Field(
        min_length=1,
        max_length=MAX_EXITS,
        description="Frames leaving at each exit; the last entry is the final head.",
    )
    operating_point: int = Field(ge=0, le=255, description="Active operating point index.")
    cpu_percent: float = Field(
        ge=0, le=102_400, description="Process CPU, 100 per fully used core."
    )
    rss_mb: float = Field(ge=0, le=16_777_216, description="Resident memory of the agent in MiB.")
    temperature_c: float | None = Field(
        None, ge=-100, le=200, description="SoC temperature; None when no sensor."
    )
    throttled: bool | None = Field(
        None, description="Thermal or under-voltage throttling now; None when unknown."
    )
    power_w: float | None = Field(None, ge=0, le=10_000, description="Power draw in watts.")
    power_source: PowerSource = Field(
        description="Where power_w comes from; 'estimate' means a model of CPU load."
    )
    energy_per_frame_mj: float | None = Field(
        None,
        ge=0,
        le=MAX_MJ,
        description="power_w / fps in millijoules; None without power or frames.",
    )
    outbox_depth: int = Field(
        ge=0, le=MAX_SEQ, description="Messages waiting in the on-disk outbox."
    )
    outbox_overflow: int = Field(
        ge=0, le=MAX_SEQ, description="Messages dropped for a full outbox since the agent started."
    )
    model_id: ModelId | None = Field(None, description="Model that ran in this window.")
    model_version: int | None = Field(
        None, ge=1, le=MAX_SEQ, description="Bundle version that ran."
    )
    # Detectors only (docs/detect.md, "Agent"); absent from a classifier's windows.
    object_counts: dict[Label, Count] | None = Field(
        None,
        max_length=MAX_COUNTED_CLASSES,
        description="Detectors: per label, the most confirmed tracks alive at once in the window.",
    )
    frames_skipped: int | None = Field(
        None,
        ge=0,
        le=MAX_COUNT,
        description="Detectors: frames the motion gate kept from the model (not in processed).",
    )
    objects_started: int | None = Field(
        None, ge=0, le=MAX_COUNT, description="Detectors: tracks confirmed in the window."
    )

    @model_validator(mode="after")
    def _window_ordered(self) -> Telemetry:
        if self.window_end < self.window_start:
            raise ValueError(
                f"window_end {self.window_end} is before window_start {self.window_start}"
            )
        return self


class DetectedObject(Strict):
    """One box of a detector's result, in frame pixels."""

    class_index: int = Field(ge=0, le=MAX_COUNT, description="Detected class.")
    label: Label = Field(description="Label of the class (at most 64 characters).")
    score: float = Field(ge=0, le=1, description="Detector score of the box.")
    x1: float = Field(ge=0, le=MAX_PX, description="Left edge, frame pixels.")
    y1: float = Field(ge=0, le=MAX_PX, description="Top edge, frame pixels.")
    x2: float = Field(ge=0, le=MAX_PX, description="Right edge, frame pixels.")
    y2: float = Field(ge=0, le=MAX_PX, description="Bottom edge, frame pixels.")
    track_id: int | None = Field(
        None, ge=0, le=MAX_SEQ, description="Confirmed track the box belongs to; None: none yet."
    )

    @model_validator(mode="after")
    def _ordered(self) -> DetectedObject:
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(
                f"box must satisfy x1 <= x2 and y1 <= y2, got "
                f"({self.x1}, {self.y1}, {self.x2}, {self.y2})"
            )
        return self


class Result(Payload, _OmitNone):
    """One inference result, sent at QoS 0, rate-limited or on change.

    A detector's result carries its boxes in `objects`; its class_index, label and
    confidence are those of the best box, or 0, "" and 0.0 when the frame has none
    (docs/detect.md, "Agent"). A classifier's result has no `objects` key at all.
    """

    KIND: ClassVar[PayloadKind] = "results"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"objects"})

    device_id: DeviceId = Field(description="The device; equals the id in the topic.")
    ts: float = Field(ge=0, le=MAX_TS, description="Unix seconds when the frame was captured.")
    frame_index: int = Field(ge=0, le=MAX_SEQ, description="Frame counter since the agent started.")
    class_index: int = Field(ge=0, le=MAX_COUNT, description="Predicted class.")
    label: str = Field(max_length=128, description="Label of the predicted class.")
    confidence: float = Field(ge=0, le=1, description="Confidence the exit rule saw.")
    exit_index: int = Field(
        ge=0, lt=MAX_EXITS, description="Exit that answered; the last is the final head."
    )
    latency_ms: float = Field(ge=0, le=MAX_MS, description="Inference latency of this frame.")
    objects: list[DetectedObject] | None = Field(
        None,
        max_length=MAX_OBJECTS,
        description="Detectors: the frame's boxes, best first; None for a classifier.",
    )

    @model_validator(mode="after")
    def _best_object(self) -> Result:
        if self.objects is None:
            return self
        if not self.objects:
            if self.confidence != 0.0 or self.label != "":
                raise ValueError("a detector result without objects has confidence 0, label ''")
            return self
        best = max(o.score for o in self.objects)
        if abs(self.confidence - best) > 1e-6:
            raise ValueError(
                f"a detector result's confidence {self.confidence} is not its best score {best}"
            )
        return self


EventKind = Literal[
    "started",
    "stopping",
    "install_progress",
    "installed",
    "rollback",
    "error",
    "camera_lost",
    "camera_restored",
    "operating_point_changed",
    "outbox_overflow",
    "config_rejected",
    "keys_changed",
    "keys_refused",
    "fed_update_sent",
    "fed_skipped",
    # Detectors: one tracked object's life (docs/detect.md, "Agent").
    "object_start",
    "object_update",
    "object_end",
]
EventLevel = Literal["debug", "info", "warning", "error"]


class Event(Payload):
    """Something that happened on the device, for humans and the rollout logic."""

    KIND: ClassVar[PayloadKind] = "events"

    device_id: DeviceId = Field(description="The device; equals the id in the topic.")
    ts: float = Field(ge=0, le=MAX_TS, description="Unix seconds when it happened.")
    seq: int = Field(
        ge=0, le=MAX_SEQ, description="Per-device event number, persisted like telemetry seq."
    )
    kind: EventKind = Field(description="What happened.")
    level: EventLevel = Field("info", description="Severity.")
    message: str = Field(max_length=1000, description="One line for a human.")
    details: dict[Annotated[str, StringConstraints(max_length=64)], DetailValue] = Field(
        default_factory=dict, max_length=32, description="Machine-readable facts of the event."
    )
