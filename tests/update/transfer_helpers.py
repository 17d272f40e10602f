"""Offers and chunks for transfer tests: random archives split as the coordinator splits them."""

from __future__ import annotations

import hashlib
import os
import time

from edgefleet.agent.protocol import BundleOffer

MANIFEST_SHA = "ab" * 32


def make_offer(
    data: bytes,
    chunk_size: int,
    *,
    model_id: str = "digits-ee",
    version: int = 3,
    chunk_sha256: list[str] | None = None,
) -> tuple[BundleOffer, list[bytes]]:
    """The offer of `data` cut into `chunk_size` chunks, and the chunks."""
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    offer = BundleOffer(
        sha256=hashlib.sha256(data).hexdigest(),
        model_id=model_id,
        version=version,
        manifest_sha256=MANIFEST_SHA,
        size=len(data),
        chunk_size=chunk_size,
        chunk_sha256=chunk_sha256 or [hashlib.sha256(c).hexdigest() for c in chunks],
        created_ts=time.time(),
    )
    return offer, chunks


def random_archive(size: int) -> bytes:
    """Incompressible bytes standing in for a gzip tar; each call its own sha256."""
    return os.urandom(size)
