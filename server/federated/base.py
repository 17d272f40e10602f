"""The bundle a round starts from: unpacked once from the archive store, verified, its heads.

The base is what the group's devices run (their status names its manifest sha256) and an
archive the coordinator holds (uploaded for an earlier rollout). A round trains the early
exits whose head is a file of the bundle (kind "features" with a head_file): an exit whose
logits come out of the ONNX graph has no weights a device could send a delta for.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.bundle import BundleError, Manifest, VerifiedBundle, unpack, verify_bundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.federated.wire import tensor_name
from edgefleet.server.rollout.archives import ArchiveInfo


@dataclass(frozen=True)
class BaseBundle:
    """A verified base bundle on disk and its archive."""

    verified: VerifiedBundle
    info: ArchiveInfo

    @property
    def manifest(self) -> Manifest:
        return self.verified.manifest

    @property
    def trainable(self) -> list[int]:
        """Early exit indexes (0 = first) whose head weights are a file of the bundle."""
        return [k for k, _ in enumerate(self.manifest.early_exits) if self._head_file(k)]

    def head_file(self, k: int) -> str:
        """The npz file of early exit k's head; ValueError when it has none."""
        name = self._head_file(k)
        if name is None:
            raise ValueError(
                f"early exit {k} of {self.manifest.model_id} v{self.manifest.version} has no "
                f"trainable head file (trainable: {self.trainable or 'none'})"
            )
        return name

    def _head_file(self, k: int) -> str | None:
        exits = self.manifest.early_exits
        if not 0 <= k < len(exits):
            return None
        head = self.manifest.stages[exits[k]].exit
        if head is None or head.kind != "features":
            return None
        return head.head_file

    def head(self, k: int) -> HeadWeights:
        """Early exit k's head as the bundle holds it (float32)."""
        return HeadWeights.from_npz_bytes(self.verified.read(self.head_file(k)))

    def shapes(self, heads: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """exit{k}.weight / exit{k}.bias -> shape: what every update of a round must carry."""
        out: dict[str, tuple[int, ...]] = {}
        for k in heads:
            h = self.head(k)
            out[tensor_name(k, "weight")] = tuple(int(n) for n in h.weight.shape)
            out[tensor_name(k, "bias")] = tuple(int(n) for n in h.bias.shape)
        return out


def open_base(
    info: ArchiveInfo, cache_dir: Path, trusted_keys: Iterable[Ed25519PublicKey]
) -> BaseBundle:
    """The archive unpacked under cache_dir/{manifest sha256} (once) and verified (each time).

    Unpacked to a temporary name and renamed, so a crash leaves no half bundle behind; a
    directory that no longer verifies is unpacked again.
    """
    if info.kind != "full":
        raise BundleError(info.path, f"a round's base must be a full archive, not {info.kind}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / info.manifest_sha256
    keys = list(trusted_keys)
    if target.is_dir():
        try:
            return _checked(verify_bundle(target, keys), info)
        except BundleError:
            shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
    try:
        unpack(info.path, tmp / "bundle")
        os.rename(tmp / "bundle", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _checked(verify_bundle(target, keys), info)


def _checked(verified: VerifiedBundle, info: ArchiveInfo) -> BaseBundle:
    if verified.manifest_sha256 != info.manifest_sha256:
        raise BundleError(
            verified.path,
            f"manifest {verified.manifest_sha256[:12]} is not the archive's "
            f"{info.manifest_sha256[:12]}",
        )
    return BaseBundle(verified, info)
