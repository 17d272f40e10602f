"""The catalogue as the loop reads it: candidates, costs, and which variant a window ran."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from edgefleet.agent.protocol import Telemetry
from edgefleet.server.fleet.store.catalogue_base import VariantRecord
from edgefleet.server.retune.latency import Config, cost
from edgefleet.server.retune.policy import Candidate

log = logging.getLogger(__name__)


def no_exit_ms(v: VariantRecord) -> float | None:
    """The build machine's ms per frame with every exit disabled, from the variant's figures."""
    try:
        est = json.loads(v.estimate_json)
    except ValueError:
        return None
    by_class = est.get("by_class") or {}
    own = by_class.get(est.get("measured_on")) if isinstance(by_class, dict) else None
    if own is None and isinstance(by_class, dict) and by_class:
        own = next(iter(by_class.values()))
    if own is None:
        lat = est.get("latency_ms") or {}
        own = lat.get("staged_no_exit") or lat.get("quantized") or lat.get("fp32")
    return float(own) if isinstance(own, int | float) and own > 0 else None


def points(v: VariantRecord) -> list[dict[str, object]]:
    """The variant's operating points as registered (accurate to fast)."""
    try:
        raw = json.loads(v.points_json)
    except ValueError:
        return []
    return [p for p in raw if isinstance(p, dict)] if isinstance(raw, list) else []


@dataclass
class CatalogueView:
    """Everything the loop needs from the variants, read once per tick."""

    variants: dict[str, VariantRecord] = field(default_factory=dict)  # by manifest sha256
    by_version: dict[tuple[str, int], VariantRecord] = field(default_factory=dict)
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)  # by catalogue model
    costs: dict[Config, float] = field(default_factory=dict)
    accuracy: dict[Config, float] = field(default_factory=dict)

    @classmethod
    def of(cls, variants: list[VariantRecord]) -> CatalogueView:
        view = cls()
        for v in variants:
            view.variants[v.manifest_sha256] = v
            view.by_version[(v.model_id, v.version)] = v
            base = no_exit_ms(v)
            for i, p in enumerate(points(v)):
                config = Config(v.manifest_sha256, i)
                acc = p.get("val_accuracy")
                macs = p.get("expected_macs")
                if isinstance(acc, int | float):
                    view.accuracy[config] = float(acc)
                if base is not None and isinstance(macs, int | float):
                    view.costs[config] = cost(base, float(macs), float(v.macs))
                if v.retired_at is None and isinstance(acc, int | float):
                    view.candidates.setdefault(v.model, []).append(
                        Candidate(v.variant_id, config, str(p.get("name", i)), float(acc))
                    )
        return view

    def config_of(self, t: Telemetry, status_manifest: str | None) -> Config | None:
        """Which catalogue configuration a window ran; None when the catalogue lacks it."""
        v = None
        if t.model_id is not None and t.model_version is not None:
            v = self.by_version.get((t.model_id, t.model_version))
        if v is None and status_manifest is not None and t.model_version is None:
            v = self.variants.get(status_manifest)
        return Config(v.manifest_sha256, t.operating_point) if v is not None else None
