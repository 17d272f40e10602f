"""Turn a downloaded bundle archive (full or delta) into an installed, verified version dir."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.bundle import BundleError, VerifiedBundle, unpack, verify_bundle
from edgefleet.agent.bundle.delta import fill_from, read_manifest_bytes
from edgefleet.agent.bundle.digest import sha256_bytes
from edgefleet.agent.bundle.tree import copy_tree

from .slots import Slots

log = logging.getLogger(__name__)


class ManifestMismatch(BundleError):
    """The archive holds another bundle than the one the command named."""


def stage_archive(
    archive: Path,
    slots: Slots,
    sources_for_delta: Sequence[Path],
    trusted_keys: Iterable[Ed25519PublicKey],
    *,
    expect_manifest_sha256: str,
) -> VerifiedBundle:
    """Unpack, fill a delta from installed bundles, verify, check the sha, move into place.

    Returns the bundle in its final version directory (not activated). Any failure removes
    the staging directory and raises a BundleError naming why; nothing else is touched.
    """
    archive = Path(archive)
    incoming = slots.new_incoming()
    try:
        unpack(archive, incoming)
        # Cheap early refusal before copying anything: the wrong bundle, whatever it holds.
        got = sha256_bytes(read_manifest_bytes(incoming))
        if got != expect_manifest_sha256:
            raise ManifestMismatch(
                archive,
                f"manifest sha256 {got[:12]}… is not the expected {expect_manifest_sha256[:12]}…",
            )
        filled = fill_from(incoming, None, sources_for_delta)
        if filled:
            log.info("bundles: %s: filled %d file(s) from installed bundles", archive, len(filled))
        verified = verify_bundle(incoming, trusted_keys)
        if verified.manifest_sha256 != expect_manifest_sha256:  # the bytes verified, again
            raise ManifestMismatch(archive, "manifest changed while it was staged")
        return slots.stage(verified)
    except BundleError:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(incoming, ignore_errors=True)
        raise BundleError(archive, f"staging failed: {exc}") from exc
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise


def stage_dir(
    src: Path, *, slots: Slots, trusted_keys: Iterable[Ed25519PublicKey]
) -> VerifiedBundle:
    """Install a bundle directory (e.g. deploy's first bundle): copy, verify, move into place."""
    incoming = slots.new_incoming()
    try:
        copy_tree(Path(src), incoming)
        return slots.stage(verify_bundle(incoming, trusted_keys))
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
