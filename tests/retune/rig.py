"""A closed-loop rig: broker, coordinator with a fast loop, a catalogue of real signed bundles.

The variants are the reference model signed as versions 1, 2, ... (real archives, so the loop's
rollouts publish and verify real bundles); their figures (accuracy per operating point, MACs,
the optimizer's latency) are set per test, and simulated devices run them at the latency
`SimVariant.point_ms` says, so a test controls exactly how fast each configuration is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.agent.bundle import pack
from edgefleet.server.catalogue.client import CatalogueClient
from edgefleet.server.catalogue.options import ModelOptions
from edgefleet.server.catalogue.upload import pack_model
from edgefleet.server.catalogue.views import VariantView
from edgefleet.server.fleet.store.catalogue_base import VariantRecord
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.reference import MODEL_PATH, load_reference_split
from edgefleet.server.retune.config import LoopConfig
from edgefleet.server.rollout.archives import ArchiveInfo
from tests.rollout.fleet import TOKEN, LocalFleet, reference_version

if TYPE_CHECKING:
    from edgefleet.server.fleet.simulate.variants import SimVariant

FAST_LOOP = LoopConfig(
    tick_s=0.3,
    miss_windows=3,
    under_windows=5,
    cooldown_s=1.0,
    canary="1",
    soak_s=1.0,
    pin_timeout_s=20.0,
    build=False,
)


@dataclass(frozen=True)
class Variant:
    """One catalogue variant: its record and what simulated devices make of it."""

    record: VariantRecord
    archive: ArchiveInfo
    sim: SimVariant | None


def add_variant(
    fleet: LocalFleet,
    version: int,
    points: list[tuple[str, float, float]],  # (name, val accuracy, share of the full MACs)
    no_exit_ms: float,
    sim_ms: tuple[float, ...] | None,
    model: str = "mnist",
) -> Variant:
    """Sign the reference model as `version`, store its archive and register it as a variant."""
    assert fleet.coordinator is not None
    bundle = reference_version(fleet.root / "bundles", fleet.key, version)
    info = fleet.coordinator.archives.add(bundle)
    macs = 1_000_000
    record = VariantRecord(
        variant_id=f"{model}-v{version}",
        model=model,
        version=version,
        model_id=info.model_id,
        bundle_sha256=info.sha256,
        manifest_sha256=info.manifest_sha256,
        job_id=None,
        options_json="{}",
        size_bytes=info.size,
        macs=macs,
        points_json=json.dumps(
            [
                {"name": n, "val_accuracy": acc, "test_accuracy": None,
                 "expected_macs": share * macs, "exit_rates": []}
                for n, acc, share in points
            ]
        ),
        default_point=0,
        estimate_json=json.dumps(
            {"measured_on": "x86-avx512", "latency_ms": {}, "by_class": {"x86-avx512": no_exit_ms}}
        ),
        created_at=time.time(),
    )
    fleet.coordinator.store.add_variant(record)
    sim = None
    if sim_ms is not None:
        from edgefleet.server.fleet.simulate.variants import SimVariant

        sim = SimVariant(
            manifest_sha256=info.manifest_sha256,
            model_id=info.model_id,
            version=version,
            point_ms=sim_ms,
            default_point=0,
        )
    return Variant(record, info, sim)


def catalogue_on_fp32(
    fleet: LocalFleet, model: str = "mnist"
) -> tuple[CatalogueClient, VariantView, Path]:
    """The reference model in the coordinator's catalogue (model id mnist-cnn) and the fp32
    reference bundle v1, the bundle a fleet runs today, imported as its first variant."""
    assert fleet.coordinator is not None
    catalogue = CatalogueClient(fleet.coordinator.url, TOKEN)
    data = write_splits_npz(load_reference_split(), fleet.root / "mnist.npz")
    options = ModelOptions(mean=[0.1307], std=[0.3081], model_id="mnist-cnn")
    catalogue.add_model(model, pack_model(MODEL_PATH, data, options))
    v1_dir = reference_version(fleet.root / "bundles", fleet.key, 1)
    pack(v1_dir, fleet.root / "v1.tar.gz")
    uploaded = catalogue.upload_bundle((fleet.root / "v1.tar.gz").read_bytes())
    return catalogue, catalogue.register_variant(model, uploaded.sha256), v1_dir
