"""What the catalogue's HTTP routes answer and take (the CLI reads the same models)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.server.fleet.store.catalogue_base import (
    BuildJobRecord,
    JobOrigin,
    JobState,
    LatencyRecord,
    ModelRecord,
    VariantRecord,
)

SHA256_PATTERN = r"^[0-9a-f]{64}$"


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _json(text: str, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


class ModelView(_View):
    """A source model of the catalogue."""

    name: str
    model_id: str = Field(description="the manifest model_id of its variants")
    source_sha256: str
    source_bytes: int
    data_sha256: str
    data_bytes: int
    options: dict[str, Any] = Field(description="given at add; its builds inherit them")
    added_at: float
    variants: int
    open_job: str | None = Field(None, description="its queued or running build job")


class PointView(_View):
    """One operating point of a variant, accurate to fast."""

    name: str
    val_accuracy: float | None
    test_accuracy: float | None = Field(description="measured at the default point only")
    expected_macs: float | None
    exit_rates: list[float] | None


class ClassLatencyView(_View):
    """How fast the fleet runs the variant at one point on one device class."""

    device_class: str
    operating_point: int
    p95_ms: float
    p50_ms: float
    windows: int
    devices: int
    power_w: float | None
    predicted_p95_ms: float | None
    updated_at: float


class VariantView(_View):
    """A signed bundle built from (or registered for) a catalogue model, with its figures."""

    variant_id: str
    model: str
    version: int
    model_id: str
    bundle_sha256: str = Field(description="its archive on the coordinator (rollouts take it)")
    manifest_sha256: str
    job_id: str | None
    options: dict[str, Any]
    size_bytes: int
    macs: int
    points: list[PointView]
    default_point: int
    estimate: dict[str, Any] = Field(
        description="the optimizer's latency: measured_on, latency_ms, by_class"
    )
    created_at: float
    retired_at: float | None
    fleet: list[ClassLatencyView] = Field(description="measured by the fleet per device class")


class JobView(_View):
    """A build job."""

    job_id: str
    model: str
    origin: JobOrigin
    options: dict[str, Any]
    state: JobState
    step: int
    steps: int
    progress: str
    variant_id: str | None
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    log_tail: list[str] | None = Field(None, description="the build log's last lines")


class ModelDetail(_View):
    """A model with its variants (oldest first) and its build jobs (newest first)."""

    model: ModelView
    variants: list[VariantView]
    jobs: list[JobView]


class RegisterRequest(_View):
    """Register a bundle the coordinator holds (POST /bundles first) as a variant."""

    bundle_sha256: str = Field(pattern=SHA256_PATTERN, description="the archive's sha256")


def model_view(r: ModelRecord, model_id: str, variants: int, open_job: str | None) -> ModelView:
    return ModelView(
        name=r.name,
        model_id=model_id,
        source_sha256=r.source_sha256,
        source_bytes=r.source_bytes,
        data_sha256=r.data_sha256,
        data_bytes=r.data_bytes,
        options=_json(r.options_json, {}),
        added_at=r.added_at,
        variants=variants,
        open_job=open_job,
    )


def latency_view(r: LatencyRecord) -> ClassLatencyView:
    return ClassLatencyView(
        device_class=r.device_class,
        operating_point=r.operating_point,
        p95_ms=r.p95_ms,
        p50_ms=r.p50_ms,
        windows=r.windows,
        devices=r.devices,
        power_w=r.power_w,
        predicted_p95_ms=r.predicted_p95_ms,
        updated_at=r.updated_at,
    )


def variant_view(v: VariantRecord, latencies: list[LatencyRecord]) -> VariantView:
    points = [
        PointView(
            name=str(p.get("name", i)),
            val_accuracy=p.get("val_accuracy"),
            test_accuracy=p.get("test_accuracy"),
            expected_macs=p.get("expected_macs"),
            exit_rates=p.get("exit_rates"),
        )
        for i, p in enumerate(_json(v.points_json, []))
        if isinstance(p, dict)
    ]
    return VariantView(
        variant_id=v.variant_id,
        model=v.model,
        version=v.version,
        model_id=v.model_id,
        bundle_sha256=v.bundle_sha256,
        manifest_sha256=v.manifest_sha256,
        job_id=v.job_id,
        options=_json(v.options_json, {}),
        size_bytes=v.size_bytes,
        macs=v.macs,
        points=points,
        default_point=v.default_point,
        estimate=_json(v.estimate_json, {}),
        created_at=v.created_at,
        retired_at=v.retired_at,
        fleet=[latency_view(r) for r in latencies],
    )


def job_view(j: BuildJobRecord, log_tail: list[str] | None = None) -> JobView:
    return JobView(
        job_id=j.job_id,
        model=j.model,
        origin=j.origin,
        options=_json(j.options_json, {}),
        state=j.state,
        step=j.step,
        steps=j.steps,
        progress=j.progress,
        variant_id=j.variant_id,
        reason=j.reason,
        created_at=j.created_at,
        started_at=j.started_at,
        finished_at=j.finished_at,
        updated_at=j.updated_at,
        log_tail=log_tail,
    )
