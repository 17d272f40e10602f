"""The operator CLI's side of the HTTP API (stdlib urllib: a few JSON calls need no more)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pydantic import TypeAdapter

from edgefleet.server.fleet.views import CommandOutcome, DeviceDetail, DeviceView, GroupView
from edgefleet.server.rollout.views import BundleView, RolloutView

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "EDGEFLEET_URL"
TOKEN_ENV = "EDGEFLEET_API_TOKEN"

_devices = TypeAdapter(list[DeviceView])
_groups = TypeAdapter(list[GroupView])
_bundles = TypeAdapter(list[BundleView])
_rollouts = TypeAdapter(list[RolloutView])


class ApiError(RuntimeError):
    """The coordinator answered with an error, or could not be reached."""


def _error_detail(raw: bytes, reason: str) -> str:
    """The coordinator's error in words: its detail, or each bad field of a 422."""
    try:
        detail = json.loads(raw).get("detail", reason)
    except (ValueError, AttributeError):
        return reason
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for err in detail:  # FastAPI's 422: {loc: ["body", "device_id"], msg: ...} per field
        if isinstance(err, dict):
            where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {err.get('msg', '?')}")
    return "; ".join(parts) or reason


class FleetClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.token = token or os.environ.get(TOKEN_ENV)
        self.timeout = timeout

    def _call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> Any:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if raw is not None:
            req.add_header("Content-Type", "application/octet-stream")
        elif data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc.read(), str(exc.reason))
            raise ApiError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"cannot reach the coordinator at {self.url}: {exc}") from None

    def devices(self, group: str | None = None) -> list[DeviceView]:
        q = f"?{urllib.parse.urlencode({'group': group})}" if group else ""
        return _devices.validate_python(self._call("GET", f"/devices{q}"))

    def device(self, device_id: str, windows: int = 10, events: int = 10) -> DeviceDetail:
        path = f"/devices/{urllib.parse.quote(device_id)}?windows={windows}&events={events}"
        return DeviceDetail.model_validate(self._call("GET", path))

    def groups(self) -> list[GroupView]:
        return _groups.validate_python(self._call("GET", "/groups"))

    def register(self, device_id: str, group: str | None = None) -> DeviceView:
        body = {"device_id": device_id, "group": group}
        return DeviceView.model_validate(self._call("POST", "/devices", body))

    def assign_group(self, device_id: str, group: str | None) -> DeviceView:
        path = f"/devices/{urllib.parse.quote(device_id)}/group"
        return DeviceView.model_validate(self._call("PUT", path, {"group": group}))

    def command(
        self,
        command: dict[str, Any],
        *,
        device: str | None = None,
        group: str | None = None,
        timeout_s: float = 5.0,
    ) -> CommandOutcome:
        if device is not None:
            path = f"/devices/{urllib.parse.quote(device)}/commands"
        elif group is not None:
            path = f"/groups/{urllib.parse.quote(group)}/commands"
        else:
            raise ValueError("give a device or a group")
        body = {"command": command, "timeout_s": timeout_s}
        return CommandOutcome.model_validate(self._call("POST", path, body))

    def publish_trust(self, document: dict[str, Any]) -> dict[str, Any]:
        """Have the coordinator publish the fleet key trust chain retained (keys/trust)."""
        return dict(self._call("POST", "/keys/trust", document))

    # -- bundles and rollouts ------------------------------------------------------------

    def upload_bundle(self, archive: bytes) -> BundleView:
        """Hand a signed bundle archive to the coordinator (it verifies it before keeping it)."""
        return BundleView.model_validate(self._call("POST", "/bundles", raw=archive))

    def bundles(self) -> list[BundleView]:
        return _bundles.validate_python(self._call("GET", "/bundles"))

    def create_rollout(self, request: dict[str, Any]) -> RolloutView:
        return RolloutView.model_validate(self._call("POST", "/rollouts", request))

    def rollouts(self, group: str | None = None) -> list[RolloutView]:
        q = f"?{urllib.parse.urlencode({'group': group})}" if group else ""
        return _rollouts.validate_python(self._call("GET", f"/rollouts{q}"))

    def rollout(self, rollout_id: str) -> RolloutView:
        return RolloutView.model_validate(
            self._call("GET", f"/rollouts/{urllib.parse.quote(rollout_id)}")
        )

    def rollout_action(self, rollout_id: str, action: str) -> RolloutView:
        path = f"/rollouts/{urllib.parse.quote(rollout_id)}/{urllib.parse.quote(action)}"
        return RolloutView.model_validate(self._call("POST", path, {}))
