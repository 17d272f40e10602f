"""HTTP routes for bundles and rollouts, mounted by the coordinator's API (fleet/api.py).

Uploading is the one large request: the archive is streamed to a file beside the archive
store (never held in memory) up to `upload_max_bytes`, then verified like any bundle a
device would get (signature, every hash) before the coordinator keeps it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from edgefleet.agent.bundle import BundleError
from edgefleet.agent.protocol.ids import ID_PATTERN
from edgefleet.server.fleet.http_json import ErrorDetail
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.store.errors import RolloutConflict
from edgefleet.server.rollout.archives import ArchiveInfo, ArchiveStore
from edgefleet.server.rollout.engine import RolloutEngine, RolloutError
from edgefleet.server.rollout.spec import RolloutSpec
from edgefleet.server.rollout.views import BundleView, RolloutRequest, RolloutView, rollout_view

RolloutIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="A rollout id.")]
GroupQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this group.")]
DEFAULT_UPLOAD_MAX_BYTES = 1 << 30


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    """Documented error answers ({"detail": "..."}), so clients and the schema agree."""
    return {int(k[1:]): {"model": ErrorDetail, "description": v} for k, v in codes.items()}


_AUTH = {"_401": "Missing or wrong bearer token.", "_403": "The coordinator has no API token."}
_UPLOAD = _errors(
    **_AUTH,
    _400="The bundle does not verify (file hash, signature, key) or is not an archive.",
    _413="The archive is larger than the upload limit.",
)
_CREATE = _errors(
    **_AUTH,
    _404="No such bundle on the coordinator, or the group has no devices.",
    _409="The group has a rollout running or paused.",
)
_ACT = _errors(**_AUTH, _404="No such rollout.", _409="Not possible in the rollout's state.")
_SHOW = _errors(_404="No such rollout.")


def bundle_view(info: ArchiveInfo, store: Store) -> BundleView:
    rec = store.bundle(info.sha256)
    return BundleView(
        sha256=info.sha256,
        kind=info.kind,
        manifest_sha256=info.manifest_sha256,
        base_manifest_sha256=info.base_manifest_sha256,
        model_id=info.model_id,
        version=info.version,
        size=info.size,
        published_at=rec.published_at if rec else None,
        cleared_at=rec.cleared_at if rec else None,
        published_bytes=rec.published_bytes if rec else None,
    )


def make_router(
    store: Store,
    engine: RolloutEngine,
    archives: ArchiveStore,
    require_token: Callable[..., None],
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES,
) -> APIRouter:
    """The /bundles and /rollouts routes over one engine."""
    router = APIRouter()
    action = [Depends(require_token)]

    def view(rollout_id: str, devices: bool = True) -> RolloutView:
        r = store.rollout(rollout_id)
        if r is None:
            raise HTTPException(404, f"unknown rollout {rollout_id!r}")
        return rollout_view(r, store.rollout_devices(rollout_id), devices)

    @router.post(
        "/bundles", tags=["rollouts"], dependencies=action, status_code=201, responses=_UPLOAD
    )
    async def upload_bundle(request: Request) -> BundleView:
        archives.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=archives.directory, prefix=".upload-", suffix=".tar.gz")
        tmp = FsPath(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for part in request.stream():
                    size += len(part)
                    if size > upload_max_bytes:
                        raise HTTPException(
                            413, f"bundle larger than the limit of {upload_max_bytes} bytes"
                        )
                    out.write(part)
            if size == 0:
                raise HTTPException(400, "empty body: send the bundle archive's bytes")
            try:
                info = await run_in_threadpool(archives.add, tmp)
            except BundleError as exc:
                raise HTTPException(400, f"bundle refused: {exc}") from None
            return bundle_view(info, store)
        finally:
            tmp.unlink(missing_ok=True)

    @router.get("/bundles", tags=["rollouts"])
    def list_bundles() -> list[BundleView]:
        return [bundle_view(info, store) for info in archives.all()]

    @router.post(
        "/rollouts", tags=["rollouts"], dependencies=action, status_code=201, responses=_CREATE
    )
    def create_rollout(body: RolloutRequest) -> RolloutView:
        spec = RolloutSpec.model_validate(body.model_dump(exclude={"bundle_sha256", "group"}))
        try:
            rollout_id = engine.create(body.group, body.bundle_sha256, spec)
        except RolloutConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except RolloutError as exc:
            raise HTTPException(404, str(exc)) from None
        return view(rollout_id)

    @router.get("/rollouts", tags=["rollouts"])
    def list_rollouts(
        group: GroupQuery = None, limit: int = Query(50, ge=1, le=1000)
    ) -> list[RolloutView]:
        return [
            rollout_view(r, store.rollout_devices(r.rollout_id), False)
            for r in store.rollouts(group=group, limit=limit)
        ]

    @router.get("/rollouts/{rollout_id}", tags=["rollouts"], responses=_SHOW)
    def show_rollout(rollout_id: RolloutIdPath) -> RolloutView:
        return view(rollout_id)

    def act(rollout_id: str, fn: Callable[[str], Any]) -> RolloutView:
        try:
            fn(rollout_id)
        except RolloutError as exc:
            status = 404 if store.rollout(rollout_id) is None else 409
            raise HTTPException(status, str(exc)) from None
        return view(rollout_id)

    @router.post(
        "/rollouts/{rollout_id}/pause", tags=["rollouts"], dependencies=action, responses=_ACT
    )
    def pause(rollout_id: RolloutIdPath) -> RolloutView:
        return act(rollout_id, engine.pause)

    @router.post(
        "/rollouts/{rollout_id}/resume", tags=["rollouts"], dependencies=action, responses=_ACT
    )
    def resume(rollout_id: RolloutIdPath) -> RolloutView:
        return act(rollout_id, engine.resume)

    @router.post(
        "/rollouts/{rollout_id}/abort", tags=["rollouts"], dependencies=action, responses=_ACT
    )
    def abort(rollout_id: RolloutIdPath) -> RolloutView:
        return act(rollout_id, engine.abort)

    return router
