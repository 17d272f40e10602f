"""Where the coordinator keeps its state: EDGEFLEET_HOME, else the XDG data directory."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The coordinator's state directory (fleet keys, bundles, store)."""
    env = os.environ.get("EDGEFLEET_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "edgefleet"


def keys_dir(root: Path | None = None) -> Path:
    """Directory of the fleet signing key pair."""
    return (root or home()) / "keys"
