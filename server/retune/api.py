"""HTTP routes for group targets and the closed loop, mounted by the coordinator's API.

Setting a target is an action (the bearer token); reading is open. Errors: 400 a change that
cannot apply (no p95 for a new target, an unknown pinned variant), 422 a body that is not a
TargetChange.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query

from edgefleet.agent.protocol.ids import ID_PATTERN
from edgefleet.server.fleet.http_json import ErrorDetail
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.retune.engine import RetuneEngine
from edgefleet.server.retune.targets import TargetError, apply_change
from edgefleet.server.retune.views import (
    DecisionView,
    GroupLoopView,
    TargetChange,
    TargetView,
    decision_view,
    target_view,
)

GroupPath = Annotated[str, Path(pattern=ID_PATTERN, description="A device group.")]
_SET: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "The change cannot apply (the detail says why)."},
    401: {"model": ErrorDetail, "description": "Missing or wrong bearer token."},
    403: {"model": ErrorDetail, "description": "The coordinator has no API token."},
}


def make_router(
    store: Store, engine: RetuneEngine | None, require_token: Callable[..., None]
) -> APIRouter:
    """The /groups/{group}/target, /groups/{group}/loop, /loop and /decisions routes."""
    router = APIRouter()

    @router.put(
        "/groups/{group}/target",
        tags=["closed loop"],
        dependencies=[Depends(require_token)],
        responses=_SET,
    )
    def set_target(group: GroupPath, body: TargetChange) -> TargetView:
        try:
            return target_view(apply_change(store, group, body))
        except TargetError as exc:
            raise HTTPException(400, str(exc)) from None

    @router.get("/groups/{group}/loop", tags=["closed loop"])
    def group_loop(group: GroupPath, decisions: int = Query(20, ge=0, le=1000)) -> GroupLoopView:
        return loop_view(store, engine, group, decisions)

    @router.get("/loop", tags=["closed loop"])
    def all_groups() -> list[GroupLoopView]:
        return [loop_view(store, engine, t.group, 0) for t in store.targets()]

    @router.get("/decisions", tags=["closed loop"])
    def decisions(
        group: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        device: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        limit: int = Query(50, ge=1, le=1000),
    ) -> list[DecisionView]:
        rows = store.decisions(group=group, limit=limit if device is None else 1000)
        if device is not None:
            rows = [d for d in rows if device in d.devices][:limit]
        return [decision_view(d) for d in rows]

    return router


def loop_view(store: Store, engine: RetuneEngine | None, group: str, n: int) -> GroupLoopView:
    """The group's target, the loop's latest view of it and its newest n decisions."""
    target = store.target(group)
    status = engine.status.get(group) if engine is not None else None
    return GroupLoopView(
        group=group,
        target=target_view(target) if target is not None else None,
        devices=status.devices if status else len(store.devices(group)),
        out_of_target=status.out_of_target if status else 0,
        pending=status.pending if status else 0,
        p95_ms=dict(status.p95_ms) if status else {},
        decisions=[decision_view(d) for d in store.decisions(group=group, limit=n)] if n else [],
    )
