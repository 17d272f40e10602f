"""Fixtures of the bundle tests: a fleet key and a signed two-stage bundle made with it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import generate_private_key, write_bundle
from tests.bundle_helpers import two_stage_body, two_stage_files


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def bundle(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    out = tmp_path / "bundle"
    write_bundle(out, two_stage_body(), two_stage_files(), key)
    return out
