"""HTTP routes of the model catalogue, mounted by the coordinator's API (fleet/api.py).

Reading is open like the rest of the API; adding models, building, cancelling, registering
and retiring are actions (bearer token). POST /models is the one large request: the upload
is streamed to a file in the catalogue directory up to the upload limit, then unpacked and
checked (upload.py, models.py) off the event loop. A bundle to register as a variant is
uploaded through POST /bundles first (its own limit and checks) and named by its sha256.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from edgefleet.agent.bundle import BundleError
from edgefleet.server.catalogue.buildlog import tail
from edgefleet.server.catalogue.errors import (
    CatalogueError,
    InvalidInput,
    ModelExists,
    NotPossible,
    UnknownJob,
    UnknownModel,
)
from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.jobs import JobRunner, submit
from edgefleet.server.catalogue.models import NAME_PATTERN, add_model, model_id_of, need_model
from edgefleet.server.catalogue.options import BuildOptions
from edgefleet.server.catalogue.upload import unpack_model
from edgefleet.server.catalogue.variants import register_archive
from edgefleet.server.catalogue.views import (
    JobView,
    ModelDetail,
    ModelView,
    RegisterRequest,
    VariantView,
    job_view,
    model_view,
    variant_view,
)
from edgefleet.server.fleet.http_json import ErrorDetail, StrictJsonRoute
from edgefleet.server.fleet.store.catalogue_base import (
    OPEN_JOB_STATES,
    CatalogueStore,
    JobState,
    ModelRecord,
)
from edgefleet.server.fleet.store.errors import JobConflict
from edgefleet.server.rollout.archives import ArchiveStore

DEFAULT_UPLOAD_MAX_BYTES = 1 << 30
_JOB_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_VARIANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"

ModelPath = Annotated[str, Path(pattern=NAME_PATTERN, description="A catalogue model name.")]
JobPath = Annotated[str, Path(pattern=_JOB_PATTERN, description="A build job id.")]
VariantPath = Annotated[str, Path(pattern=_VARIANT_PATTERN, description="A variant id.")]


@dataclass(frozen=True)
class CatalogueParts:
    """What the catalogue routes need from the coordinator."""

    files: CatalogueFiles
    runner: JobRunner
    archives: ArchiveStore
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    return {int(k[1:]): {"model": ErrorDetail, "description": v} for k, v in codes.items()}


_AUTH = {"_401": "Missing or wrong bearer token.", "_403": "The coordinator has no API token."}
_ADD = _errors(
    **_AUTH,
    _409="A model of that name (or model id) is in the catalogue.",
    _413="The upload is larger than the limit.",
)
_BUILD = _errors(
    **_AUTH,
    _404="No such model.",
    _409="The model has a build queued or running, or the coordinator cannot sign builds.",
)
_CANCEL = _errors(**_AUTH, _404="No such job.", _409="The job has ended or is registering.")
_REGISTER = _errors(
    **_AUTH,
    _404="No such model, or no such bundle on the coordinator.",
    _409="The bundle is registered already.",
)
_RETIRE = _errors(**_AUTH, _404="No such variant.")


def _http(exc: CatalogueError) -> HTTPException:
    status = {
        UnknownModel: 404,
        UnknownJob: 404,
        ModelExists: 409,
        NotPossible: 409,
        InvalidInput: 422,
    }.get(type(exc), 400)
    return HTTPException(status, str(exc))


def make_router(
    store: CatalogueStore, parts: CatalogueParts, require_token: Callable[..., None]
) -> APIRouter:
    """/models, /jobs and /variants over one catalogue."""
    router = APIRouter(route_class=StrictJsonRoute)
    action = [Depends(require_token)]
    files, runner, archives = parts.files, parts.runner, parts.archives

    def open_jobs() -> dict[str, str]:
        return {j.model: j.job_id for j in store.jobs(states=list(OPEN_JOB_STATES), limit=10_000)}

    def one_model(r: ModelRecord, open_by_model: dict[str, str]) -> ModelView:
        return model_view(r, model_id_of(r), len(store.variants(r.name)), open_by_model.get(r.name))

    def one_variant(variant_id: str) -> VariantView:
        v = store.variant(variant_id)
        if v is None:
            raise HTTPException(404, f"no variant {variant_id!r}")
        return variant_view(v, store.latencies(v.manifest_sha256))

    @router.post(
        "/models", tags=["catalogue"], dependencies=action, status_code=201, responses=_ADD
    )
    async def add(
        request: Request,
        name: Annotated[str, Query(pattern=NAME_PATTERN, description="the catalogue name")],
    ) -> ModelView:
        uploads = files.uploads_dir()
        work = FsPath(tempfile.mkdtemp(dir=uploads, prefix="add-"))
        try:
            size = 0
            with (work / "upload.tar").open("wb") as out:
                async for part in request.stream():
                    size += len(part)
                    if size > parts.upload_max_bytes:
                        raise HTTPException(
                            413, f"upload larger than the limit of {parts.upload_max_bytes} bytes"
                        )
                    out.write(part)
            if size == 0:
                raise HTTPException(422, "empty body: send the model's tar archive")

            def unpack_and_add() -> ModelRecord:
                got = unpack_model(work / "upload.tar", work / "u", parts.upload_max_bytes)
                (work / "upload.tar").unlink()
                return add_model(store, files, name, got.source, got.data, got.options)

            try:
                record = await run_in_threadpool(unpack_and_add)
            except CatalogueError as exc:
                raise _http(exc) from None
            return one_model(record, {})
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @router.get("/models", tags=["catalogue"])
    def list_models() -> list[ModelView]:
        open_by_model = open_jobs()
        return [one_model(r, open_by_model) for r in store.models()]

    @router.get("/models/{name}", tags=["catalogue"], responses=_errors(_404="No such model."))
    def show_model(
        name: ModelPath, jobs: int = Query(20, ge=0, le=1000, description="jobs to list")
    ) -> ModelDetail:
        try:
            record = need_model(store, name)
        except UnknownModel as exc:
            raise _http(exc) from None
        model_jobs = store.jobs(model=name, limit=jobs) if jobs else []
        open_job = next((j.job_id for j in model_jobs if j.state in OPEN_JOB_STATES), None)
        if open_job is None and jobs == 0:
            open_job = open_jobs().get(name)
        return ModelDetail(
            model=model_view(record, model_id_of(record), len(store.variants(name)), open_job),
            variants=[
                variant_view(v, store.latencies(v.manifest_sha256)) for v in store.variants(name)
            ],
            jobs=[job_view(j) for j in model_jobs],
        )

    @router.post(
        "/models/{name}/builds",
        tags=["catalogue"],
        dependencies=action,
        status_code=202,
        responses=_BUILD,
    )
    def build(name: ModelPath, body: BuildOptions) -> JobView:
        refusal = runner.build_refusal()
        if refusal is not None:
            raise HTTPException(409, refusal)
        try:
            job = submit(store, name, body, "operator")
        except CatalogueError as exc:
            raise _http(exc) from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None
        runner.wake()
        return job_view(job)

    @router.get("/jobs", tags=["catalogue"])
    def list_jobs(
        model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        state: JobState | None = None,
        limit: int = Query(50, ge=1, le=1000),
    ) -> list[JobView]:
        states = [state] if state is not None else None
        return [job_view(j) for j in store.jobs(model=model, states=states, limit=limit)]

    @router.get("/jobs/{job_id}", tags=["catalogue"], responses=_errors(_404="No such job."))
    def show_job(
        job_id: JobPath, log_lines: int = Query(40, ge=0, le=1000, description="log tail")
    ) -> JobView:
        job = store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no build job {job_id!r}")
        return job_view(job, tail(files.path(job.log_path), log_lines))

    @router.post(
        "/jobs/{job_id}/cancel", tags=["catalogue"], dependencies=action, responses=_CANCEL
    )
    def cancel(job_id: JobPath) -> JobView:
        try:
            return job_view(runner.cancel(job_id))
        except CatalogueError as exc:
            raise _http(exc) from None

    @router.post(
        "/models/{name}/variants",
        tags=["catalogue"],
        dependencies=action,
        status_code=201,
        responses=_REGISTER,
    )
    def register(name: ModelPath, body: RegisterRequest) -> VariantView:
        info = archives.get(body.bundle_sha256)
        if info is None:
            raise HTTPException(
                404, f"no bundle {body.bundle_sha256} on the coordinator: upload it first"
            )
        try:
            v = register_archive(store, archives, name, info)
        except CatalogueError as exc:
            raise _http(exc) from None
        except BundleError as exc:
            raise HTTPException(422, f"bundle refused: {exc}") from None
        return variant_view(v, store.latencies(v.manifest_sha256))

    @router.get("/variants", tags=["catalogue"])
    def list_variants(
        model: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    ) -> list[VariantView]:
        return [variant_view(v, store.latencies(v.manifest_sha256)) for v in store.variants(model)]

    @router.get(
        "/variants/{variant_id}", tags=["catalogue"], responses=_errors(_404="No such variant.")
    )
    def show_variant(variant_id: VariantPath) -> VariantView:
        return one_variant(variant_id)

    def retire_as(variant_id: str, at: float | None) -> VariantView:
        try:
            store.retire_variant(variant_id, at)
        except KeyError:
            raise HTTPException(404, f"no variant {variant_id!r}") from None
        return one_variant(variant_id)

    @router.post(
        "/variants/{variant_id}/retire", tags=["catalogue"], dependencies=action,
        responses=_RETIRE,
    )
    def retire(variant_id: VariantPath) -> VariantView:
        return retire_as(variant_id, time.time())

    @router.post(
        "/variants/{variant_id}/restore", tags=["catalogue"], dependencies=action,
        responses=_RETIRE,
    )
    def restore(variant_id: VariantPath) -> VariantView:
        return retire_as(variant_id, None)

    return router

