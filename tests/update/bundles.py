"""Signed small bundles for the update tests: a v3 and a v4 that differs only in its exit head."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import Manifest, write_bundle
from tests.bundle_helpers import two_stage_body, two_stage_files


def new_head(seed: int) -> bytes:
    """An exit head .npz other than two_stage_files()'s (same shapes)."""
    rng = np.random.default_rng(1000 + seed)
    buf = io.BytesIO()
    np.savez(
        buf,
        weight=rng.standard_normal((3, 4)).astype(np.float32),
        bias=np.zeros(3, np.float32),
    )
    return buf.getvalue()


def write_version(out: Path, key: Ed25519PrivateKey, version: int) -> Manifest:
    """Version 3 is two_stage_files(); every later version changes only heads/exit0.npz."""
    files = two_stage_files()
    if version != 3:
        files["heads/exit0.npz"] = new_head(version)
    return write_bundle(out, two_stage_body(version=version), files, key)
