"""The operator CLI's side of the catalogue routes, on the fleet API client."""

from __future__ import annotations

import urllib.parse
from typing import Any

from pydantic import TypeAdapter

from edgefleet.server.catalogue.views import JobView, ModelDetail, ModelView, VariantView
from edgefleet.server.fleet.client import FleetClient

_models = TypeAdapter(list[ModelView])
_jobs = TypeAdapter(list[JobView])
_variants = TypeAdapter(list[VariantView])


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


class CatalogueClient(FleetClient):
    """FleetClient plus the model catalogue."""

    def add_model(self, name: str, upload: bytes) -> ModelView:
        """Upload a model (upload.pack_model's tar) under a catalogue name."""
        path = f"/models?{urllib.parse.urlencode({'name': name})}"
        return ModelView.model_validate(self._call("POST", path, raw=upload))

    def models(self) -> list[ModelView]:
        return _models.validate_python(self._call("GET", "/models"))

    def model(self, name: str, jobs: int = 20) -> ModelDetail:
        return ModelDetail.model_validate(self._call("GET", f"/models/{_q(name)}?jobs={jobs}"))

    def build(self, name: str, options: dict[str, Any]) -> JobView:
        return JobView.model_validate(self._call("POST", f"/models/{_q(name)}/builds", options))

    def jobs(
        self, model: str | None = None, state: str | None = None, limit: int = 50
    ) -> list[JobView]:
        query: dict[str, Any] = {"limit": limit}
        if model:
            query["model"] = model
        if state:
            query["state"] = state
        return _jobs.validate_python(self._call("GET", f"/jobs?{urllib.parse.urlencode(query)}"))

    def job(self, job_id: str, log_lines: int = 40) -> JobView:
        path = f"/jobs/{_q(job_id)}?log_lines={log_lines}"
        return JobView.model_validate(self._call("GET", path))

    def cancel_job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/jobs/{_q(job_id)}/cancel", {}))

    def register_variant(self, name: str, bundle_sha256: str) -> VariantView:
        body = {"bundle_sha256": bundle_sha256}
        path = f"/models/{_q(name)}/variants"
        return VariantView.model_validate(self._call("POST", path, body))

    def variants(self, model: str | None = None) -> list[VariantView]:
        q = f"?{urllib.parse.urlencode({'model': model})}" if model else ""
        return _variants.validate_python(self._call("GET", f"/variants{q}"))

    def retire_variant(self, variant_id: str, retire: bool = True) -> VariantView:
        action = "retire" if retire else "restore"
        path = f"/variants/{_q(variant_id)}/{action}"
        return VariantView.model_validate(self._call("POST", path, {}))
