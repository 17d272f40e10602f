"""Federated rounds on the wire: the coordinator's task, and a device's weight update.

A round's `FedTask` is retained on `fed/{round}/task` until the round closes (the coordinator
clears it), so a device that connects mid-round still sees it. A device that takes part
publishes one `FedUpdate` (QoS 1) on `fed/{round}/update/{device}`: per-head weight deltas
(new - base) of the exit heads named by the task, never a frame. The coordinator dedupes
redeliveries by (device, round, base manifest) and ignores an update whose base is not the
task's. See docs/protocol.md, "Federated rounds".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints, model_validator

from edgefleet.agent.protocol.base import ModelId, Payload, PayloadKind, Strict
from edgefleet.agent.protocol.bounds import MAX_SEQ, MAX_TS
from edgefleet.agent.protocol.ids import ID_PATTERN, DeviceId, GroupName, Sha256Hex

RoundId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# exit{k}.weight / exit{k}.bias: the arrays of exit head k's npz file.
TensorName = Annotated[str, StringConstraints(pattern=r"^exit[0-9]{1,2}\.(weight|bias)$")]
Compression = Literal["fp32", "fp16", "q8"]
BYTES_PER_VALUE: dict[str, int] = {"fp32": 4, "fp16": 2, "q8": 1}
MAX_TENSOR_VALUES = 256 * 1024  # a 10-class head on a 25k-wide feature: far above a real exit
MAX_HEADS = 16


def sampled(round_id: str, device_id: str, fraction: float) -> bool:
    """Does this device take part in the round? The same answer on device and coordinator.

    A hash rather than a coin: the coordinator knows who to expect without being told, and a
    device restarted mid-round decides the same way.
    """
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{round_id}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class PrivacySpec(Strict):
    """Update-level differential privacy: clip each device's update, then add Gaussian noise."""

    clip: float = Field(gt=0, le=1e6, description="L2 bound on a device's whole update.")
    noise_multiplier: float = Field(
        ge=0, le=100, description="Noise std = noise_multiplier x clip, per coordinate."
    )


class FedTask(Payload):
    """Retained on fed/{round}/task: what to train, how, by when."""

    KIND: ClassVar[PayloadKind] = "fed_task"

    round_id: RoundId = Field(description="The round; equals the topic's.")
    model_id: ModelId = Field(description="Devices running another model ignore the round.")
    base_manifest_sha256: Sha256Hex = Field(
        description="The bundle whose heads are the starting point; devices running another "
        "bundle ignore the round (their update would be stale)."
    )
    base_version: int = Field(ge=1, le=MAX_SEQ, description="That bundle's version.")
    group: GroupName | None = Field(None, description="Only devices of this group take part.")
    heads: list[Annotated[int, Field(ge=0, le=MAX_HEADS - 1)]] = Field(
        min_length=1, max_length=MAX_HEADS, description="Early exits to train (0 = first)."
    )
    labels: Literal["pseudo", "supplied", "both"] = Field(
        "both",
        description="pseudo: the final head's confident predictions; supplied: labels given "
        "to the device (command or folder); both: supplied where there are any, else pseudo.",
    )
    min_confidence: float = Field(
        0.9, ge=0, le=1, description="Pseudo labels only from final predictions this sure."
    )
    min_samples: int = Field(32, ge=1, le=1_000_000, description="Fewer: the device sits out.")
    val_fraction: float = Field(
        0.2, gt=0, le=0.5, description="Share of the device's examples kept for validation."
    )
    local_epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(0.05, gt=0, le=10)
    batch_size: int = Field(32, ge=1, le=4096)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    prox_mu: float = Field(0.0, ge=0, le=100, description="FedProx term; 0 is plain FedAvg.")
    cpu_budget_s: float = Field(
        60.0, gt=0, le=3600, description="CPU seconds the local training may use at most."
    )
    sampling: float = Field(
        1.0, gt=0, le=1, description="Share of eligible devices that take part (see sampled())."
    )
    privacy: PrivacySpec | None = Field(None, description="Differential privacy, if any.")
    clip: float | None = Field(
        None, gt=0, le=1e6, description="L2 clip of each update without noise (robustness)."
    )
    compression: Compression = Field("fp16", description="How deltas travel.")
    deadline_ts: float = Field(ge=0, le=MAX_TS, description="Updates after this are ignored.")
    created_ts: float = Field(ge=0, le=MAX_TS)

    @model_validator(mode="after")
    def _distinct_heads(self) -> FedTask:
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be distinct exit indexes, got {self.heads}")
        return self


class EncodedTensor(Strict):
    """One array of a delta, compressed (agent/federated/compress.py), base64 on the wire."""

    name: TensorName
    shape: list[Annotated[int, Field(ge=1, le=MAX_TENSOR_VALUES)]] = Field(
        min_length=1, max_length=2
    )
    scheme: Compression
    scale: float = Field(0.0, ge=0, le=1e9, description="q8: value = offset + scale x byte.")
    offset: float = Field(0.0, ge=-1e9, le=1e9)
    data: str = Field(max_length=4 * MAX_TENSOR_VALUES * 4 // 3 + 4, description="base64")

    @model_validator(mode="after")
    def _length_fits_shape(self) -> EncodedTensor:
        values = 1
        for d in self.shape:
            values *= d
        if values > MAX_TENSOR_VALUES:
            raise ValueError(f"{self.name}: {values} values, over {MAX_TENSOR_VALUES}")
        try:
            raw = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{self.name}: data is not base64 ({exc})") from exc
        want = values * BYTES_PER_VALUE[self.scheme]
        if len(raw) != want:
            raise ValueError(
                f"{self.name}: {len(raw)} bytes for shape {self.shape} in {self.scheme}; "
                f"expected {want}"
            )
        return self

    @property
    def raw(self) -> bytes:
        """The decoded bytes."""
        return base64.b64decode(self.data)


class FedUpdate(Payload):
    """Published (QoS 1) on fed/{round}/update/{device}: one device's contribution."""

    KIND: ClassVar[PayloadKind] = "fed_update"

    round_id: RoundId
    device_id: DeviceId = Field(description="The device; equals the id in the topic.")
    model_id: ModelId
    base_manifest_sha256: Sha256Hex = Field(description="The bundle the delta applies to.")
    base_version: int = Field(ge=1, le=MAX_SEQ)
    samples: int = Field(ge=1, le=1_000_000_000, description="Training examples (its weight).")
    supplied_samples: int = Field(0, ge=0, le=1_000_000_000)
    val_samples: int = Field(ge=0, le=1_000_000_000)
    tensors: list[EncodedTensor] = Field(min_length=1, max_length=2 * MAX_HEADS)
    train_loss: float | None = Field(None, ge=0, le=1e6)
    val_accuracy_before: float | None = Field(None, ge=0, le=1)
    val_accuracy_after: float | None = Field(None, ge=0, le=1)
    val_exit_rate_before: float | None = Field(
        None, ge=0, le=1, description="Share of validation examples the trained exits take."
    )
    val_exit_rate_after: float | None = Field(None, ge=0, le=1)
    norm: float = Field(
        ge=0, le=1e12, description="L2 norm of the delta before clipping and noise."
    )
    clipped: bool = False
    noise_multiplier: float = Field(0.0, ge=0, le=100)
    epochs_done: float = Field(ge=0, le=1000)
    stopped_by_budget: bool = False
    cpu_s: float = Field(ge=0, le=1e6)
    raw_bytes: int = Field(ge=0, le=MAX_SEQ, description="The delta's size in float32.")
    encoded_bytes: int = Field(ge=0, le=MAX_SEQ, description="Its size as sent (before base64).")
    ts: float = Field(ge=0, le=MAX_TS)

    @model_validator(mode="after")
    def _unique_names(self) -> FedUpdate:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names repeat: {sorted(names)}")
        if self.supplied_samples > self.samples:
            raise ValueError("supplied_samples exceeds samples")
        return self
