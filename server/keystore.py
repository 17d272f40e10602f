"""The fleet signing key: created once, private half 0600, public half exportable."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.agent.bundle import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)

log = logging.getLogger(__name__)

PRIVATE_NAME = "fleet.key"
PUBLIC_NAME = "fleet.pub"


@dataclass(frozen=True)
class FleetKey:
    """The loaded key pair and where it lives."""

    private: Ed25519PrivateKey
    directory: Path

    @property
    def public(self) -> Ed25519PublicKey:
        """The verification half, what devices hold."""
        return self.private.public_key()

    @property
    def id(self) -> str:
        """Short fingerprint shown to operators and written into manifests."""
        return key_id(self.public)

    @property
    def public_path(self) -> Path:
        """Path of the exported public key."""
        return self.directory / PUBLIC_NAME


def init_key(directory: Path) -> tuple[FleetKey, bool]:
    """Load the fleet key in directory, creating it if absent; returns (key, created)."""
    private_path = directory / PRIVATE_NAME
    if private_path.exists():
        key = FleetKey(load_private_key(private_path), directory)
        if not key.public_path.exists():
            save_public_key(key.public, key.public_path)
        elif key_id(load_public_key(key.public_path)) != key.id:
            raise ValueError(f"{key.public_path} does not match {private_path}")
        return key, False
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = generate_private_key()
    save_private_key(private, private_path)
    save_public_key(private.public_key(), directory / PUBLIC_NAME)
    key = FleetKey(private, directory)
    log.info("created fleet key %s in %s", key.id, directory)
    return key, True


def load_key(directory: Path) -> FleetKey:
    """Load an existing fleet key; a missing key is an error telling how to create one."""
    private_path = directory / PRIVATE_NAME
    if not private_path.exists():
        raise FileNotFoundError(f"no fleet key at {private_path}: run `edgefleet keys init` first")
    return FleetKey(load_private_key(private_path), directory)
