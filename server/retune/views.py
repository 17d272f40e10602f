"""What the API and the CLI show of group targets and the closed loop's decisions."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.agent.protocol.ids import ID_PATTERN
from edgefleet.server.fleet.store.catalogue_base import DecisionRecord, GroupTarget


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TargetChange(_View):
    """`edgefleet group set`: only the fields given change (p95_ms is needed the first time)."""

    p95_ms: float | None = Field(None, gt=0, le=600_000, description="p95 latency target, ms.")
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="Validation accuracy floor of any variant chosen."
    )
    max_power_w: float | None = Field(None, gt=0, le=10_000, description="Power ceiling, W.")
    loop: bool | None = Field(None, description="False: the loop changes nothing here.")
    pin_variant: str | None = Field(
        None, pattern=ID_PATTERN, description="Keep the group on this variant."
    )
    unpin_variant: bool = Field(False, description="Let the loop choose variants again.")
    clear_accuracy: bool = Field(False, description="Drop the accuracy floor.")
    clear_power: bool = Field(False, description="Drop the power ceiling.")


class TargetView(_View):
    """A group's target as stored."""

    group: str
    p95_ms: float
    min_accuracy: float | None
    max_power_w: float | None
    loop: bool
    pinned_variant: str | None
    updated_at: float


class DecisionView(_View):
    """One decision of the loop, with the numbers behind it."""

    decision_id: int
    group: str
    ts: float
    action: str
    devices: list[str]
    message: str
    details: dict[str, Any]
    rollout_id: str | None
    job_id: str | None


class GroupLoopView(_View):
    """A group's target, how its devices stand against it now, and its latest decisions."""

    group: str
    target: TargetView | None
    devices: int
    out_of_target: int
    pending: int
    p95_ms: dict[str, float]
    decisions: list[DecisionView]


def target_view(t: GroupTarget) -> TargetView:
    return TargetView(
        group=t.group,
        p95_ms=t.p95_ms,
        min_accuracy=t.min_accuracy,
        max_power_w=t.max_power_w,
        loop=t.loop,
        pinned_variant=t.pinned_variant,
        updated_at=t.updated_at,
    )


def decision_view(d: DecisionRecord) -> DecisionView:
    try:
        details = json.loads(d.details_json)
    except ValueError:
        details = {}
    return DecisionView(
        decision_id=d.decision_id,
        group=d.group,
        ts=d.ts,
        action=d.action,
        devices=list(d.devices),
        message=d.message,
        details=details if isinstance(details, dict) else {},
        rollout_id=d.rollout_id,
        job_id=d.job_id,
    )


def decision_lines(decisions: list[DecisionView]) -> list[str]:
    """One line per decision, newest first, as `group show` and `fleet show` print them."""
    lines = []
    for d in decisions:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.ts))
        extra = f" [rollout {d.rollout_id}]" if d.rollout_id else ""
        extra += f" [job {d.job_id}]" if d.job_id else ""
        lines.append(f"{stamp}  #{d.decision_id} {d.action:<9} {d.message}{extra}")
    return lines
