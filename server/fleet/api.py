"""The coordinator's HTTP API (FastAPI; the OpenAPI document is at /openapi.json).

Reading the fleet is open to whoever reaches the port, like a Prometheus scrape; anything
that changes a device (commands, group assignment) needs the bearer token. Without a
configured token, actions are refused rather than left open. The token and the body size
limit are checked in front of FastAPI (http_guard.py), before a body is read; bodies are
parsed as strict JSON and bad input of any kind is a 422 (http_json.py), never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edgefleet.agent import __version__
from edgefleet.agent.protocol.ids import ID_PATTERN
from edgefleet.server.catalogue.api import CatalogueParts
from edgefleet.server.catalogue.api import make_router as make_catalogue_router
from edgefleet.server.federated.api import make_router as make_rounds_router
from edgefleet.server.federated.rounds import RoundEngine
from edgefleet.server.fleet.commander import Commander, UnknownTarget
from edgefleet.server.fleet.http_guard import (
    DEFAULT_MAX_BODY_BYTES,
    RequestGuard,
    bearer_refusal,
)
from edgefleet.server.fleet.http_json import (
    ErrorDetail,
    StrictJsonRoute,
    validation_error_handler,
)
from edgefleet.server.fleet.ingest import IngestStats
from edgefleet.server.fleet.keys_api import make_keys_router
from edgefleet.server.fleet.metrics import render
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.views import (
    CommandOutcome,
    CommandRequest,
    DeviceDetail,
    DeviceView,
    EventView,
    GroupAssignment,
    GroupView,
    Registration,
    SequenceView,
    WindowView,
)
from edgefleet.server.retune.api import make_router as make_loop_router
from edgefleet.server.retune.engine import RetuneEngine
from edgefleet.server.rollout.api import DEFAULT_UPLOAD_MAX_BYTES, make_router
from edgefleet.server.rollout.archives import ArchiveStore
from edgefleet.server.rollout.engine import RolloutEngine

_bearer = HTTPBearer(auto_error=False)

# Ids are checked by the schema itself, so the OpenAPI document says what is accepted and a
# bad id is an ordinary 422 in FastAPI's shape.
DeviceIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="A device id.")]
GroupPath = Annotated[str, Path(pattern=ID_PATTERN, description="A group name.")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorDetail, "description": "Unknown device or empty group."}
}
_ACTION: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "Missing or wrong bearer token."},
    403: {"model": ErrorDetail, "description": "The coordinator has no API token: no actions."},
    413: {"model": ErrorDetail, "description": "The body is larger than the limit."},
}
_COMMAND: dict[int | str, dict[str, Any]] = {
    **_ACTION,
    **_NOT_FOUND,
    503: {"model": ErrorDetail, "description": "No broker connection for commands."},
}


def create_app(
    store: Store,
    *,
    token: str | None,
    commander: Commander | None = None,
    stats: IngestStats | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    rollouts: RolloutParts | None = None,
    rounds: RoundEngine | None = None,
    retune: RetuneEngine | None = None,
    catalogue: CatalogueParts | None = None,
) -> FastAPI:
    """The API over one store; commander is None when no broker connection is available.

    rollouts adds /bundles and /rollouts (the coordinator's rollout engine and archives);
    rounds adds /fed/rounds (federated rounds, server/federated/api.py). Group targets and the
    closed loop's decisions are always served (server/retune/api.py); retune adds the loop's
    live view of each group. catalogue adds /models, /jobs and /variants (the model
    catalogue, server/catalogue/api.py).
    """
    app = FastAPI(
        title="edgefleet coordinator",
        version=__version__,
        description="Fleet registry, telemetry and device commands.",
        exception_handlers={RequestValidationError: validation_error_handler},
    )
    app.router.route_class = StrictJsonRoute
    uploads = {"/bundles": rollouts.upload_max_bytes} if rollouts is not None else {}
    if catalogue is not None:
        uploads["/models"] = catalogue.upload_max_bytes
    app.add_middleware(
        RequestGuard, token=token, max_body_bytes=max_body_bytes, path_limits=uploads
    )

    def require_token(
        request: Request,
        _cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        # RequestGuard refused a wrong token before the body was read; checking again here
        # keeps a route declared as an action closed whatever its method, and _bearer puts
        # the bearer scheme into the OpenAPI document.
        refusal = bearer_refusal(token, request.headers.get("authorization"))
        if refusal is not None:
            status, detail = refusal
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            raise HTTPException(status, detail, headers=headers)

    def known_device(device_id: str) -> str:
        if store.device(device_id) is None:
            raise HTTPException(404, f"unknown device {device_id!r}")
        return device_id

    def need_commander() -> Commander:
        if commander is None:
            raise HTTPException(503, "this coordinator has no broker connection for commands")
        return commander

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str | int]:
        return {"status": "ok", "schema_version": store.schema_version()}

    @app.get("/devices", tags=["fleet"])
    def list_devices(
        group: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    ) -> list[DeviceView]:
        return [DeviceView.of(d) for d in store.devices(group)]

    @app.get("/devices/{device_id}", tags=["fleet"], responses=_NOT_FOUND)
    def show_device(
        device_id: DeviceIdPath,
        windows: Annotated[int, Query(ge=0, le=1000)] = 10,
        events: Annotated[int, Query(ge=0, le=1000)] = 10,
    ) -> DeviceDetail:
        rec = store.device(known_device(device_id))
        assert rec is not None
        seq = store.sequence_reports(device_id)
        return DeviceDetail(
            device=DeviceView.of(rec),
            sequence=SequenceView.of(seq[0]) if seq else None,
            windows=[WindowView.of(w) for w in store.telemetry(device_id, windows)],
            events=[EventView.of(e) for e in store.events(device_id, events)],
        )

    @app.get("/devices/{device_id}/telemetry", tags=["fleet"], responses=_NOT_FOUND)
    def device_telemetry(
        device_id: DeviceIdPath, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> list[WindowView]:
        return [WindowView.of(w) for w in store.telemetry(known_device(device_id), limit)]

    @app.get("/groups", tags=["fleet"])
    def list_groups() -> list[GroupView]:
        return [GroupView(group=g, devices=n) for g, n in sorted(store.groups().items())]

    @app.get("/events", tags=["fleet"], responses=_NOT_FOUND)
    def list_events(
        device: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[EventView]:
        if device is not None:
            known_device(device)
        return [EventView.of(e) for e in store.events(device, limit)]

    @app.post("/devices", tags=["actions"], dependencies=[Depends(require_token)],
              status_code=201, responses=_ACTION)
    def register_device(body: Registration) -> DeviceView:
        store.register(body.device_id, body.group)
        rec = store.device(body.device_id)
        assert rec is not None
        return DeviceView.of(rec)

    @app.put("/devices/{device_id}/group", tags=["actions"],
             dependencies=[Depends(require_token)], responses={**_ACTION, **_NOT_FOUND})
    def assign_group(device_id: DeviceIdPath, body: GroupAssignment) -> DeviceView:
        known_device(device_id)
        store.set_group(device_id, body.group)
        rec = store.device(device_id)
        assert rec is not None
        return DeviceView.of(rec)

    @app.post("/devices/{device_id}/commands", tags=["actions"],
              dependencies=[Depends(require_token)], responses=_COMMAND)
    def command_device(device_id: DeviceIdPath, body: CommandRequest) -> CommandOutcome:
        known_device(device_id)
        return _send(need_commander(), body, device=device_id)

    @app.post("/groups/{group}/commands", tags=["actions"],
              dependencies=[Depends(require_token)], responses=_COMMAND)
    def command_group(group: GroupPath, body: CommandRequest) -> CommandOutcome:
        return _send(need_commander(), body, group=group)

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
    def metrics() -> Response:
        return PlainTextResponse(render(store, stats), media_type="text/plain; version=0.0.4")

    app.include_router(make_keys_router(need_commander, require_token))
    if rollouts is not None:
        app.include_router(
            make_router(
                store,
                rollouts.engine,
                rollouts.archives,
                require_token,
                upload_max_bytes=rollouts.upload_max_bytes,
            )
        )
    if rounds is not None:
        app.include_router(make_rounds_router(store, rounds, require_token))
    app.include_router(make_loop_router(store, retune, require_token))
    if catalogue is not None:
        app.include_router(make_catalogue_router(store, catalogue, require_token))
    return app


@dataclass(frozen=True)
class RolloutParts:
    """What the /bundles and /rollouts routes need from the coordinator."""

    engine: RolloutEngine
    archives: ArchiveStore
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES


def _send(
    commander: Commander, body: CommandRequest, *, device: str | None = None,
    group: str | None = None,
) -> CommandOutcome:
    try:
        return commander.send(
            body.command,
            device=device,
            group=group,
            timeout_s=body.timeout_s,
            expires_s=body.expires_s,
        )
    except UnknownTarget as exc:
        raise HTTPException(404, str(exc)) from None
