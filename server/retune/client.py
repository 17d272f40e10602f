"""The operator CLI's side of the closed loop's routes, on the fleet API client."""

from __future__ import annotations

import urllib.parse
from typing import Any

from pydantic import TypeAdapter

from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.retune.views import DecisionView, GroupLoopView, TargetView

_decisions = TypeAdapter(list[DecisionView])
_loops = TypeAdapter(list[GroupLoopView])


class LoopClient(FleetClient):
    """FleetClient plus targets and decisions."""

    def set_target(self, group: str, change: dict[str, Any]) -> TargetView:
        path = f"/groups/{urllib.parse.quote(group)}/target"
        return TargetView.model_validate(self._call("PUT", path, change))

    def group_loop(self, group: str, decisions: int = 20) -> GroupLoopView:
        path = f"/groups/{urllib.parse.quote(group)}/loop?decisions={decisions}"
        return GroupLoopView.model_validate(self._call("GET", path))

    def loops(self) -> list[GroupLoopView]:
        return _loops.validate_python(self._call("GET", "/loop"))

    def decisions(
        self, group: str | None = None, device: str | None = None, limit: int = 50
    ) -> list[DecisionView]:
        query: dict[str, Any] = {"limit": limit}
        if group:
            query["group"] = group
        if device:
            query["device"] = device
        return _decisions.validate_python(
            self._call("GET", f"/decisions?{urllib.parse.urlencode(query)}")
        )
