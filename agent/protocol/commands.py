"""Coordinator -> device commands and the device's reply."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from edgefleet.agent.protocol.base import ModelId, Payload, PayloadKind, Strict
from edgefleet.agent.protocol.bounds import MAX_SEQ, MAX_TS, BoundedJson
from edgefleet.agent.protocol.ids import ID_PATTERN, DeviceId, Sha256Hex
from edgefleet.agent.protocol.messages import MAX_EXITS

# Printable ASCII without spaces: the id is echoed in logs and replies.
CORRELATION_ID_PATTERN = r"^[\x21-\x7e]{1,64}$"
# The id of a reply to a command whose own id could not be read (not JSON, no id): the
# sender still hears that something it sent was refused. Never a UUID, so never a real id.
UNCORRELATED_ID = "-"

RolloutId = Annotated[str, Field(pattern=ID_PATTERN)]


class Ping(Strict):
    """Ask for an empty reply; measures the round trip."""

    name: Literal["ping"] = "ping"


class SetOperatingPoint(Strict):
    """Switch to an operating point of the installed bundle."""

    name: Literal["set_operating_point"] = "set_operating_point"
    index: int = Field(ge=0, le=255, description="Operating point index in the manifest.")
    pin: bool = Field(False, description="Keep it: the on-device tuner may not move away.")


class UnpinOperatingPoint(Strict):
    """Let the on-device tuner choose the operating point again."""

    name: Literal["unpin_operating_point"] = "unpin_operating_point"


class SetThresholds(Strict):
    """Override the confidence threshold of each exit."""

    name: Literal["set_thresholds"] = "set_thresholds"
    # Same shape as a manifest operating point's thresholds, so one can be sent as is.
    thresholds: list[Annotated[float, Field(ge=0, le=1)] | None] = Field(
        min_length=1,
        max_length=MAX_EXITS,
        description="One per early exit in order (the final head has none); null disables it.",
    )


class SetTelemetryInterval(Strict):
    """Change the length of a telemetry window."""

    name: Literal["set_telemetry_interval"] = "set_telemetry_interval"
    seconds: float = Field(ge=1, le=3600, description="New window length.")


class Snapshot(Strict):
    """Send one camera frame as JPEG in the reply; the only way a frame leaves a device."""

    name: Literal["snapshot"] = "snapshot"
    quality: int = Field(80, ge=10, le=100, description="JPEG quality.")


class ReloadBundle(Strict):
    """Reload the installed bundle from disk."""

    name: Literal["reload_bundle"] = "reload_bundle"


class DeltaRef(Strict):
    """A delta archive of the same bundle, usable by a device that has its base installed."""

    sha256: Sha256Hex = Field(description="sha256 of the delta archive; names its topics.")
    base_manifest_sha256: Sha256Hex = Field(
        description="Manifest sha256 of the bundle the delta was built on."
    )


class InstallBundle(Strict):
    """Fetch the bundle archive offered under this sha256, verify it and switch to it.

    The reply only says whether the install was accepted (or is already done); its progress
    and outcome come as events carrying `install_state` and `manifest_sha256`.
    """

    name: Literal["install_bundle"] = "install_bundle"
    sha256: Sha256Hex = Field(description="sha256 of the full archive; names its transfer topics.")
    model_id: ModelId = Field(description="Model the archive must contain.")
    version: int = Field(ge=1, le=MAX_SEQ, description="Version the archive must contain.")
    manifest_sha256: Sha256Hex = Field(description="Manifest sha256 the bundle must have.")
    delta: DeltaRef | None = Field(
        None, description="A smaller archive to use instead when the device has its base."
    )
    rollout_id: RolloutId | None = Field(None, description="Rollout this install belongs to.")
    allow_model_change: bool = Field(
        False,
        description="Accept a bundle of another model_id or input shape than the running one.",
    )


class RollbackBundle(Strict):
    """Go back to the previous installed bundle if the device runs the one named."""

    name: Literal["rollback_bundle"] = "rollback_bundle"
    manifest_sha256: Sha256Hex = Field(
        description="Roll back only from this bundle; a device running another one does nothing."
    )
    rollout_id: RolloutId | None = Field(None, description="Rollout that asks for it.")
    reason: str = Field("", max_length=500, description="Why, for the device's event and log.")


# To add a command: define its class with a unique `name` literal and append it here.
# An agent that does not know a name rejects the command and replies with the error.
AnyCommand = Annotated[
    Ping
    | SetOperatingPoint
    | UnpinOperatingPoint
    | SetThresholds
    | SetTelemetryInterval
    | Snapshot
    | ReloadBundle
    | InstallBundle
    | RollbackBundle,
    Field(discriminator="name"),
]


class Command(Payload):
    """Envelope of a command: correlation id, expiry and the command itself."""

    KIND: ClassVar[PayloadKind] = "cmd"

    id: str = Field(
        pattern=CORRELATION_ID_PATTERN, description="Correlation id; the reply carries it."
    )
    ts: float = Field(ge=0, le=MAX_TS, description="Unix seconds when the coordinator issued it.")
    expires_at: float | None = Field(
        None, ge=0, le=MAX_TS, description="Unix seconds after which the device ignores it."
    )
    command: AnyCommand = Field(description="What to do, told apart by its 'name'.")

    @model_validator(mode="after")
    def _expiry_after_issue(self) -> Command:
        if self.expires_at is not None and self.expires_at < self.ts:
            raise ValueError(f"expires_at {self.expires_at} is before ts {self.ts}")
        return self

    def is_expired(self, now: float) -> bool:
        """Tell whether the command must be ignored at unix time now."""
        return self.expires_at is not None and now > self.expires_at


class Reply(Payload):
    """A device's answer to one command, on its own reply topic."""

    KIND: ClassVar[PayloadKind] = "reply"

    id: str = Field(
        pattern=CORRELATION_ID_PATTERN, description="Correlation id of the command answered."
    )
    device_id: DeviceId = Field(description="The device; equals the id in the topic.")
    ts: float = Field(ge=0, le=MAX_TS, description="Unix seconds when the device answered.")
    ok: bool = Field(description="Whether the command was carried out.")
    error: str | None = Field(
        None, min_length=1, max_length=1000, description="Why not; required when ok is false."
    )
    result: dict[str, BoundedJson] | None = Field(
        None, description="Command-specific output; a snapshot puts base64 JPEG in 'jpeg_b64'."
    )

    @model_validator(mode="after")
    def _error_iff_failed(self) -> Reply:
        if not self.ok and self.error is None:
            raise ValueError("error is required when ok is false")
        if self.ok and self.error is not None:
            raise ValueError("error must be null when ok is true")
        return self
