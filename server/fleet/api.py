"""The coordinator's HTTP API (FastAPI; the OpenAPI document is at /openapi.json).

Reading the fleet is open to whoever reaches the port, like a Prometheus scrape; anything
that changes a device (commands, group assignment) needs the bearer token. Without a
configured token, actions are refused rather than left open.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edgefleet.agent import __version__
from edgefleet.agent.protocol.ids import is_valid_id
from edgefleet.server.fleet.commander import Commander, UnknownTarget
from edgefleet.server.fleet.ingest import IngestStats
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

_bearer = HTTPBearer(auto_error=False)


def create_app(
    store: Store,
    *,
    token: str | None,
    commander: Commander | None = None,
    stats: IngestStats | None = None,
) -> FastAPI:
    """The API over one store; commander is None when no broker connection is available."""
    app = FastAPI(
        title="edgefleet coordinator",
        version=__version__,
        description="Fleet registry, telemetry and device commands.",
    )

    def require_token(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if token is None:
            raise HTTPException(403, "actions are disabled: the coordinator has no API token set")
        if cred is None or not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def known_device(device_id: str) -> str:
        if not is_valid_id(device_id):
            raise HTTPException(422, f"invalid device id {device_id!r}")
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
    def list_devices(group: str | None = None) -> list[DeviceView]:
        return [DeviceView.of(d) for d in store.devices(group)]

    @app.get("/devices/{device_id}", tags=["fleet"])
    def show_device(
        device_id: str,
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

    @app.get("/devices/{device_id}/telemetry", tags=["fleet"])
    def device_telemetry(
        device_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> list[WindowView]:
        return [WindowView.of(w) for w in store.telemetry(known_device(device_id), limit)]

    @app.get("/groups", tags=["fleet"])
    def list_groups() -> list[GroupView]:
        return [GroupView(group=g, devices=n) for g, n in sorted(store.groups().items())]

    @app.get("/events", tags=["fleet"])
    def list_events(
        device: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> list[EventView]:
        if device is not None:
            known_device(device)
        return [EventView.of(e) for e in store.events(device, limit)]

    @app.post("/devices", tags=["actions"], dependencies=[Depends(require_token)],
              status_code=201)
    def register_device(body: Registration) -> DeviceView:
        for value, what in ((body.device_id, "device id"), (body.group, "group name")):
            if value is not None and not is_valid_id(value):
                raise HTTPException(422, f"invalid {what} {value!r}")
        store.register(body.device_id, body.group)
        rec = store.device(body.device_id)
        assert rec is not None
        return DeviceView.of(rec)

    @app.put(
        "/devices/{device_id}/group", tags=["actions"], dependencies=[Depends(require_token)]
    )
    def assign_group(device_id: str, body: GroupAssignment) -> DeviceView:
        known_device(device_id)
        if body.group is not None and not is_valid_id(body.group):
            raise HTTPException(422, f"invalid group name {body.group!r}")
        store.set_group(device_id, body.group)
        rec = store.device(device_id)
        assert rec is not None
        return DeviceView.of(rec)

    @app.post(
        "/devices/{device_id}/commands", tags=["actions"], dependencies=[Depends(require_token)]
    )
    def command_device(device_id: str, body: CommandRequest) -> CommandOutcome:
        known_device(device_id)
        return _send(need_commander(), body, device=device_id)

    @app.post("/groups/{group}/commands", tags=["actions"], dependencies=[Depends(require_token)])
    def command_group(group: str, body: CommandRequest) -> CommandOutcome:
        if not is_valid_id(group):
            raise HTTPException(422, f"invalid group name {group!r}")
        return _send(need_commander(), body, group=group)

    @app.get("/metrics", tags=["meta"])
    def metrics() -> Response:
        return Response(render(store, stats), media_type="text/plain; version=0.0.4")

    return app


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
