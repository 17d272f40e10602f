"""What the API and the CLI show of bundles and rollouts."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.protocol.ids import GroupName, Sha256Hex
from edgefleet.server.rollout.spec import RolloutSpec


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleView(_View):
    """One archive the coordinator holds."""

    sha256: str
    kind: str
    manifest_sha256: str
    base_manifest_sha256: str | None
    model_id: str
    version: int
    size: int
    published_at: float | None = None
    cleared_at: float | None = None
    published_bytes: int | None = None


class RolloutRequest(RolloutSpec):
    """POST /rollouts: which bundle to which group, and how."""

    bundle_sha256: Sha256Hex = Field(description="An archive uploaded with POST /bundles.")
    group: GroupName


class RolloutDeviceView(_View):
    """One device's place in a rollout."""

    device_id: str
    wave: int
    state: str
    have: int | None
    total: int | None
    reason: str | None
    sent_at: float | None
    deadline_at: float | None
    updated_at: float | None


class RolloutView(_View):
    """A rollout, its counts per device state and (for `show`) every device."""

    rollout_id: str
    group: str
    model_id: str
    version: int
    bundle_sha256: str
    manifest_sha256: str
    state: str
    phase: str
    reason: str | None
    created_at: float
    updated_at: float | None
    spec: RolloutSpec
    counts: dict[str, int]
    devices: list[RolloutDeviceView] | None = None


def rollout_view(r: Any, devices: list[Any], with_devices: bool) -> RolloutView:
    """Build the view from the store's rollout and rollout-device records."""
    return RolloutView(
        rollout_id=r.rollout_id,
        group=r.group,
        model_id=r.model_id,
        version=r.version,
        bundle_sha256=r.bundle_sha256,
        manifest_sha256=r.manifest_sha256,
        state=r.state,
        phase=r.phase,
        reason=r.reason,
        created_at=r.created_at,
        updated_at=r.updated_at,
        spec=RolloutSpec.model_validate_json(r.spec_json),
        counts=dict(Counter(d.state for d in devices)),
        devices=[
            RolloutDeviceView(
                device_id=d.device_id,
                wave=d.wave,
                state=d.state,
                have=d.have,
                total=d.total,
                reason=d.reason,
                sent_at=d.sent_at,
                deadline_at=d.deadline_at,
                updated_at=d.updated_at,
            )
            for d in devices
        ]
        if with_devices
        else None,
    )
