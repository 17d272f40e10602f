"""Who may connect to the fleet's broker: each identity's role and group, kept in identities.json.

The password file and the ACL are derived from this registry on every change, so the three never
disagree about who exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.agent.protocol.ids import DeviceId, GroupName
from edgefleet.server.identity.files import write_private

Role = Literal["device", "coordinator"]


class Identity(BaseModel):
    """One broker client: a device (its username is its device id) or a coordinator."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    group: GroupName | None = Field(None, description="devices: the group whose cmd it reads")


class Registry(BaseModel):
    """Every identity the broker knows, by username."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    identities: dict[DeviceId, Identity] = Field(default_factory=dict)


class RegistryError(ValueError):
    """identities.json cannot be read; the message names the file."""


def load_registry(path: Path) -> Registry:
    """The registry at path; a missing file is an empty registry."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return Registry()
    try:
        return Registry.model_validate_json(raw)
    except ValidationError as exc:
        raise RegistryError(f"{path}: not a valid identity registry: {exc}") from None


def save_registry(path: Path, registry: Registry) -> None:
    """Write the registry atomically, 0600 (it maps devices to groups: not for everyone)."""
    write_private(path, json.dumps(registry.model_dump(mode="json"), indent=2, sort_keys=True))
