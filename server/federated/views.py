"""What the API and the CLI show of federated rounds."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict

from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.fleet.store.base import FedRoundRecord, FedUpdateRecord


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundUpdateView(_View):
    """One device's update in a round and what became of it."""

    device_id: str
    base_manifest_sha256: str
    status: str
    reason: str | None
    samples: int
    norm: float | None
    received_at: float


class RoundView(_View):
    """A round, its counts per update status and (for `show`) every update."""

    round_id: str
    group: str
    state: str
    phase: str
    reason: str | None
    model_id: str
    base_manifest_sha256: str
    base_version: int
    heads: list[int]
    expected: list[str]
    received: int
    rejected: int
    deadline_at: float
    created_at: float
    updated_at: float
    closed_at: float | None
    spec: RoundSpec
    figures: dict[str, Any] | None
    result_version: int | None
    result_path: str | None
    result_bundle_sha256: str | None
    rollout_id: str | None
    counts: dict[str, int]
    updates: list[RoundUpdateView] | None = None


def round_view(
    r: FedRoundRecord, updates: list[FedUpdateRecord], with_updates: bool
) -> RoundView:
    """Build the view from the store's round and update records."""
    task = json.loads(r.task_json)
    return RoundView(
        round_id=r.round_id,
        group=r.group,
        state=r.state,
        phase=r.phase,
        reason=r.reason,
        model_id=r.model_id,
        base_manifest_sha256=r.base_manifest_sha256,
        base_version=r.base_version,
        heads=[int(k) for k in task.get("heads", [])],
        expected=list(r.expected),
        received=r.received,
        rejected=r.rejected,
        deadline_at=r.deadline_at,
        created_at=r.created_at,
        updated_at=r.updated_at,
        closed_at=r.closed_at,
        spec=RoundSpec.model_validate_json(r.spec_json),
        figures=json.loads(r.figures_json) if r.figures_json else None,
        result_version=r.result_version,
        result_path=r.result_path,
        result_bundle_sha256=r.result_bundle_sha256,
        rollout_id=r.rollout_id,
        counts=dict(Counter(u.status for u in updates)),
        updates=[
            RoundUpdateView(
                device_id=u.device_id,
                base_manifest_sha256=u.base_manifest_sha256,
                status=u.status,
                reason=u.reason,
                samples=u.samples,
                norm=u.norm,
                received_at=u.received_at,
            )
            for u in updates
        ]
        if with_updates
        else None,
    )
