"""Variants: signed bundles of a catalogue model, with the figures the loop chooses by.

A build's variant takes its figures from the optimizer's report (validation accuracy,
expected MACs and exit rates per operating point, test accuracy at the default point, the
build machine's latency) and from the bundle's manifest (the per-class latency it promises
devices). A bundle registered as it is (register_bundle: a fleet already runs it) takes what
its manifest says. Either way the archive is in the coordinator's archive store first, so a
variant always names an archive the rollout engine can ship.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle import Manifest, unpack, verify_bundle
from edgefleet.server.catalogue.errors import InvalidInput, NotPossible
from edgefleet.server.catalogue.models import model_id_of, need_model
from edgefleet.server.catalogue.process import ask_checker
from edgefleet.server.fleet.store.catalogue_base import (
    CatalogueStore,
    ModelRecord,
    VariantRecord,
)
from edgefleet.server.rollout.archives import ArchiveInfo, ArchiveStore

log = logging.getLogger(__name__)

# The one point of a bundle without early exits: every frame runs the whole model.
FULL_POINT = "full"


def variant_id(model: str, version: int) -> str:
    return f"{model}-v{version}"


def next_version(store: CatalogueStore, archives: ArchiveStore, model: str, model_id: str) -> int:
    """Above every variant of the model and every stored archive of its model id: devices
    install only newer versions, and an archive left by a build that never registered still
    holds its number."""
    versions = [v.version for v in store.variants(model)]
    versions += [a.version for a in archives.all() if a.model_id == model_id]
    return max(versions, default=0) + 1


def manifest_of(archives: ArchiveStore, info: ArchiveInfo) -> Manifest:
    """The manifest of a stored archive, read from a fresh verified unpack of its bytes."""
    with tempfile.TemporaryDirectory(dir=archives.directory, prefix=".manifest-") as tmp:
        verified = verify_bundle(unpack(info.path, Path(tmp) / "b"), archives.trusted_keys)
        if verified.manifest_sha256 != info.manifest_sha256:
            raise NotPossible(f"archive {info.sha256} changed on disk since it was stored")
        return verified.manifest


def _stage_macs(manifest: Manifest, bundle_dir: Path | None) -> int:
    """The whole model's MACs: the stages' recorded figures, counted from their files (by
    checker.py) where one is missing (a bundle not written by the optimizer); 0 when unknown."""
    recorded = [s.macs for s in manifest.stages]
    if all(m is not None for m in recorded):
        return sum(m for m in recorded if m is not None)
    if bundle_dir is None:
        return 0
    try:
        counted = ask_checker(["macs", str(bundle_dir)])["macs"]
    except (RuntimeError, KeyError) as exc:
        log.warning("MACs of bundle %s unknown: %s", bundle_dir, exc)
        return 0
    return sum(m if m is not None else int(c) for m, c in zip(recorded, counted, strict=True))


def _points(
    raw: list[dict[str, Any]], default: int, test_accuracy: float | None
) -> list[dict[str, Any]]:
    return [
        {
            "name": p.get("name", str(i)),
            "val_accuracy": p.get("val_accuracy"),
            # The optimizer evaluates the test split at the default point only.
            "test_accuracy": test_accuracy if i == default else None,
            "expected_macs": p.get("expected_macs"),
            "exit_rates": p.get("exit_rates"),
        }
        for i, p in enumerate(raw)
    ]


def _full_point(val: float | None, test: float | None, macs: int) -> list[dict[str, Any]]:
    """The single point of a bundle without exits (telemetry reports operating point 0)."""
    return [
        {
            "name": FULL_POINT,
            "val_accuracy": val,
            "test_accuracy": test,
            "expected_macs": float(macs),
            "exit_rates": [1.0],
        }
    ]


def variant_from_report(
    model: ModelRecord,
    job_id: str,
    options_json: str,
    info: ArchiveInfo,
    manifest: Manifest,
    report: dict[str, Any],
    measured_on: str,
) -> VariantRecord:
    """The variant of a finished build: figures from its report.json and manifest."""
    exits = report.get("exits") or {}
    default = int(exits.get("default", 0))
    test = (report.get("test") or {}).get("accuracy")
    macs = int((report.get("model") or {}).get("macs") or _stage_macs(manifest, None))
    raw = exits.get("operating_points") or []
    if raw:
        points = _points(raw, default, test)
    else:
        val = (report.get("quantization") or {}).get("val_accuracy")
        points, default = _full_point(val, test, macs), 0
    health = manifest.health
    estimate = {
        "measured_on": measured_on,
        "latency_ms": report.get("latency_ms") or {},
        "by_class": dict(health.latency_ms) if health is not None else {},
    }
    return _record(model, job_id, options_json, info, manifest, points, default, macs, estimate)


def variant_from_manifest(
    model: ModelRecord, info: ArchiveInfo, manifest: Manifest, bundle_dir: Path | None
) -> VariantRecord:
    """The variant of a bundle registered as it is: what its manifest says."""
    macs = _stage_macs(manifest, bundle_dir)
    default = manifest.default_operating_point
    test = manifest.metrics.accuracy
    if manifest.operating_points:
        points = _points([p.model_dump() for p in manifest.operating_points], default, test)
    else:
        points, default = _full_point(None, test, macs), 0
    health = manifest.health
    estimate = {
        "measured_on": None,
        "latency_ms": dict(manifest.metrics.latency_ms),
        "by_class": dict(health.latency_ms) if health is not None else {},
    }
    return _record(model, None, "{}", info, manifest, points, default, macs, estimate)


def _record(
    model: ModelRecord,
    job_id: str | None,
    options_json: str,
    info: ArchiveInfo,
    manifest: Manifest,
    points: list[dict[str, Any]],
    default: int,
    macs: int,
    estimate: dict[str, Any],
) -> VariantRecord:
    return VariantRecord(
        variant_id=variant_id(model.name, manifest.version),
        model=model.name,
        version=manifest.version,
        model_id=manifest.model_id,
        bundle_sha256=info.sha256,
        manifest_sha256=info.manifest_sha256,
        job_id=job_id,
        options_json=options_json,
        size_bytes=info.size,
        macs=macs,
        points_json=json.dumps(points),
        default_point=default,
        estimate_json=json.dumps(estimate, sort_keys=True),
        created_at=time.time(),
    )


def register_archive(
    store: CatalogueStore, archives: ArchiveStore, model: str, info: ArchiveInfo
) -> VariantRecord:
    """Register an archive the archive store holds as a variant of a catalogue model.

    UnknownModel, InvalidInput (a delta, or another model id than the model's), NotPossible
    (its id or manifest is registered already).
    """
    record = need_model(store, model)
    if info.kind != "full":
        raise InvalidInput(f"archive {info.sha256} is a delta; register the full bundle")
    with tempfile.TemporaryDirectory(dir=archives.directory, prefix=".register-") as tmp:
        bundle_dir = unpack(info.path, Path(tmp) / "b")
        verified = verify_bundle(bundle_dir, archives.trusted_keys)
        manifest = verified.manifest
        if manifest.model_id != model_id_of(record):
            raise InvalidInput(
                f"the bundle's model id is {manifest.model_id!r}, but model {model!r} builds "
                f"{model_id_of(record)!r}; add the model with --model-id {manifest.model_id}"
            )
        variant = variant_from_manifest(record, info, manifest, bundle_dir)
    try:
        store.add_variant(variant)
    except ValueError as exc:
        raise NotPossible(str(exc)) from None
    log.info(
        "catalogue: registered bundle %s v%d (archive %s) as variant %s",
        manifest.model_id,
        manifest.version,
        info.sha256[:12],
        variant.variant_id,
    )
    return variant


def register_bundle(
    store: CatalogueStore, archives: ArchiveStore, model: str, bundle: Path
) -> VariantRecord:
    """Register an existing signed bundle (a directory or an archive) as a variant of a
    catalogue model (job_id None): verified and stored in the archive store first
    (BundleError when it does not verify), then as register_archive."""
    need_model(store, model)
    return register_archive(store, archives, model, archives.add(bundle))
