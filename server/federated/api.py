"""HTTP routes for federated rounds, mounted by the coordinator's API (fleet/api.py).

Starting and aborting a round are actions (the bearer token); reading rounds is open, like
the rest of the fleet's state. Errors: 400 the spec does not fit the base bundle or the
group's size, 404 no such round or a group without devices, 409 the group already has a
round running, its devices do not agree on one base (or the coordinator lacks it), or the
round is not in a state for the action; 422 a body that is not a valid RoundSpec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from starlette.concurrency import run_in_threadpool

from edgefleet.agent.protocol.ids import ID_PATTERN
from edgefleet.server.federated.rounds import (
    RoundEngine,
    RoundError,
    RoundNotFound,
    RoundSpecError,
)
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.federated.views import RoundView, round_view
from edgefleet.server.fleet.http_json import ErrorDetail
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.store.errors import FedRoundConflict

RoundIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="A federated round id.")]
GroupQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this group.")]


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    """Documented error answers ({"detail": "..."}), so clients and the schema agree."""
    return {int(k[1:]): {"model": ErrorDetail, "description": v} for k, v in codes.items()}


_AUTH = {"_401": "Missing or wrong bearer token.", "_403": "The coordinator has no API token."}
_START = _errors(
    **_AUTH,
    _400="The spec does not fit the base bundle (heads) or the group (quorum, krum's f).",
    _404="The group has no devices.",
    _409="The group has a round running, its online devices do not run one bundle the "
    "coordinator holds, or none was sampled.",
)
_ACT = _errors(**_AUTH, _404="No such round.", _409="Not possible in the round's state.")
_SHOW = _errors(_404="No such round.")


def make_router(
    store: Store, engine: RoundEngine, require_token: Callable[..., None]
) -> APIRouter:
    """The /fed/rounds routes over one round engine."""
    router = APIRouter()
    action = [Depends(require_token)]

    def view(round_id: str, updates: bool = True) -> RoundView:
        r = store.fed_round(round_id)
        if r is None:
            raise HTTPException(404, f"unknown round {round_id!r}")
        return round_view(r, store.fed_updates(round_id), updates)

    @router.post(
        "/fed/rounds", tags=["federated"], dependencies=action, status_code=201, responses=_START
    )
    async def start_round(body: RoundSpec) -> RoundView:
        try:
            # Opening the base bundle the first time unpacks and verifies it: not on the loop.
            round_id = await run_in_threadpool(engine.create, body)
        except FedRoundConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except RoundSpecError as exc:
            raise HTTPException(400, str(exc)) from None
        except RoundNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except RoundError as exc:
            raise HTTPException(409, str(exc)) from None
        return view(round_id)

    @router.get("/fed/rounds", tags=["federated"])
    def list_rounds(
        group: GroupQuery = None, limit: int = Query(50, ge=1, le=1000)
    ) -> list[RoundView]:
        return [
            round_view(r, store.fed_updates(r.round_id), False)
            for r in store.fed_rounds(group=group, limit=limit)
        ]

    @router.get("/fed/rounds/{round_id}", tags=["federated"], responses=_SHOW)
    def show_round(round_id: RoundIdPath) -> RoundView:
        return view(round_id)

    @router.post(
        "/fed/rounds/{round_id}/abort", tags=["federated"], dependencies=action, responses=_ACT
    )
    def abort_round(round_id: RoundIdPath) -> RoundView:
        try:
            engine.abort(round_id)
        except RoundNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except RoundError as exc:
            raise HTTPException(409, str(exc)) from None
        return view(round_id)

    return router
