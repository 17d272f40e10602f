"""The operator CLI's side of the /fed/rounds routes, on the fleet API client."""

from __future__ import annotations

import urllib.parse
from typing import Any

from pydantic import TypeAdapter

from edgefleet.server.federated.views import RoundView
from edgefleet.server.fleet.client import FleetClient

_rounds = TypeAdapter(list[RoundView])


class RoundClient(FleetClient):
    """FleetClient plus federated rounds."""

    def start_round(self, spec: dict[str, Any]) -> RoundView:
        return RoundView.model_validate(self._call("POST", "/fed/rounds", spec))

    def rounds(self, group: str | None = None, limit: int = 50) -> list[RoundView]:
        query = {"limit": limit, **({"group": group} if group else {})}
        return _rounds.validate_python(
            self._call("GET", f"/fed/rounds?{urllib.parse.urlencode(query)}")
        )

    def round(self, round_id: str) -> RoundView:
        return RoundView.model_validate(
            self._call("GET", f"/fed/rounds/{urllib.parse.quote(round_id)}")
        )

    def abort_round(self, round_id: str) -> RoundView:
        path = f"/fed/rounds/{urllib.parse.quote(round_id)}/abort"
        return RoundView.model_validate(self._call("POST", path, {}))
