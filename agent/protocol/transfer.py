"""The retained offer describing one bundle archive sent as content-addressed chunks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from edgefleet.agent.protocol.base import ModelId, Payload, PayloadKind
from edgefleet.agent.protocol.bounds import MAX_SEQ, MAX_TS
from edgefleet.agent.protocol.ids import Sha256Hex

MAX_CHUNK_SIZE = 1024 * 1024
# 900 digests of 67 JSON bytes each stay inside the 64 KiB limit on a meta payload.
MAX_CHUNKS = 900


class BundleOffer(Payload):
    """Retained on bundle/{sha256}/meta: what a device needs to fetch and check every chunk."""

    KIND: ClassVar[PayloadKind] = "bundle_meta"

    sha256: Sha256Hex = Field(description="sha256 of the whole archive; equals the topic's.")
    model_id: ModelId = Field(description="Model inside the archive.")
    version: int = Field(ge=1, le=MAX_SEQ, description="Bundle version inside the archive.")
    manifest_sha256: Sha256Hex = Field(
        description="sha256 of the bundle's manifest.json: names the bundle itself, so a device "
        "that already has it installed needs nothing"
    )
    kind: Literal["full", "delta"] = Field(
        "full",
        description="full: the whole bundle; delta: the manifest, its signature and only the "
        "files whose sha256 the base bundle does not have",
    )
    base_manifest_sha256: Sha256Hex | None = Field(
        None, description="delta only: manifest sha256 of the bundle the delta was built on"
    )
    size: int = Field(ge=1, le=MAX_CHUNKS * MAX_CHUNK_SIZE, description="Archive size in bytes.")
    chunk_size: int = Field(
        ge=1, le=MAX_CHUNK_SIZE, description="Bytes per chunk; the last chunk may be shorter."
    )
    chunk_sha256: list[Sha256Hex] = Field(
        min_length=1,
        max_length=MAX_CHUNKS,
        description="sha256 of each chunk in order; its length is the chunk count.",
    )
    created_ts: float = Field(
        ge=0, le=MAX_TS, description="Unix seconds when the offer was published."
    )

    @model_validator(mode="after")
    def _chunks_cover_size(self) -> BundleOffer:
        if (self.kind == "delta") != (self.base_manifest_sha256 is not None):
            raise ValueError("base_manifest_sha256 is required for a delta and only for one")
        expected = -(-self.size // self.chunk_size)
        if len(self.chunk_sha256) != expected:
            raise ValueError(
                f"{len(self.chunk_sha256)} chunk digests for size {self.size} and chunk_size "
                f"{self.chunk_size}; expected {expected}"
            )
        return self

    @property
    def chunk_count(self) -> int:
        """Number of chunks."""
        return len(self.chunk_sha256)

    def chunk_length(self, index: int) -> int:
        """Exact byte length chunk index must have."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} out of range 0..{self.chunk_count - 1}")
        return min(self.chunk_size, self.size - index * self.chunk_size)
