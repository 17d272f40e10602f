"""The coordinator's bundle archives on disk: verified once on the way in, content-addressed.

Layout of the directory:
- {sha256}.tar.gz: an archive, named by the sha256 of its bytes (the name of its MQTT topics);
- {sha256}.json: what add() or delta() learned about it (ArchiveInfo), so get() needs no
  second unpack of a 900 MiB archive. Written before the archive is renamed into place, so an
  archive that is visible always has its description; a description without its archive
  (a crash in between) is ignored.
Everything is written to a temporary name in the same directory and renamed, so a reader
never sees half an archive.

A full archive is verified completely (signature by a trusted key, every file's hash) after a
safe unpack of exactly the bytes that are stored: what the coordinator publishes is what it
checked. A delta archive cannot verify on its own (it lacks the files its base has); it is
only ever built here from a verified full archive and its verified base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.bundle import BundleError, pack, unpack, verify_bundle
from edgefleet.agent.bundle.delta import make_delta
from edgefleet.agent.bundle.digest import sha256_file
from edgefleet.agent.durable import fsync_dir

log = logging.getLogger(__name__)

_SUFFIX = ".tar.gz"


@dataclass(frozen=True)
class ArchiveInfo:
    """One stored archive: its sha256, which bundle it holds and how big it is."""

    sha256: str
    manifest_sha256: str
    model_id: str
    version: int
    size: int
    input_shape: tuple[int | str, ...]
    path: Path
    kind: Literal["full", "delta"] = "full"
    base_manifest_sha256: str | None = None  # delta only: the bundle it applies on


# A delta larger than this share of the full archive is not worth a second copy on the broker.
MAX_DELTA_SHARE = 0.8


class ArchiveStore:
    """Verified bundle archives in one directory, looked up by archive or manifest sha256."""

    def __init__(self, directory: Path, trusted_keys: Iterable[Ed25519PublicKey]) -> None:
        self.directory = Path(directory)
        self.trusted_keys = list(trusted_keys)

    def add(self, path: Path) -> ArchiveInfo:
        """Verify a bundle directory (packed here) or archive and store it; BundleError if bad.

        Adding the same bytes again returns the stored archive's info.
        """
        path = Path(path)
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".add-") as tmp_name:
            tmp = Path(tmp_name)
            candidate = tmp / f"archive{_SUFFIX}"
            if path.is_dir():
                pack(path, candidate)
            elif path.is_file():
                # Verify and store one private copy, not a file someone may still change.
                shutil.copyfile(path, candidate)
            else:
                raise BundleError(path, "neither a bundle directory nor an archive file")
            try:
                unpacked = unpack(candidate, tmp / "bundle")
                verified = verify_bundle(unpacked, self.trusted_keys)
            except BundleError as exc:
                # Name what the operator gave, not the temporary copy that was checked.
                raise type(exc)(path, exc.detail) from exc
            sha, size = sha256_file(candidate)
            info = ArchiveInfo(
                sha256=sha,
                manifest_sha256=verified.manifest_sha256,
                model_id=verified.manifest.model_id,
                version=verified.manifest.version,
                size=size,
                input_shape=tuple(verified.manifest.input.shape),
                path=self._archive(sha),
            )
            self._put(candidate, info)
        log.info(
            "stored bundle %s v%d as %s (%d bytes) from %s",
            info.model_id,
            info.version,
            info.path.name,
            info.size,
            path,
        )
        return info

    def get(self, sha256: str) -> ArchiveInfo | None:
        """The stored archive with this sha256, or None."""
        if not _is_sha256(sha256):
            return None
        meta, archive = self._meta(sha256), self._archive(sha256)
        if not (meta.is_file() and archive.is_file()):
            return None
        try:
            raw = json.loads(meta.read_text())
            raw["path"] = archive
            raw["input_shape"] = tuple(raw["input_shape"])
            return ArchiveInfo(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring archive %s: unreadable description %s: %s", sha256, meta, exc)
            return None

    def all(self) -> list[ArchiveInfo]:
        """Every stored archive, sorted by model id, version, then kind and sha256."""
        found = [
            info
            for p in self.directory.glob(f"*{_SUFFIX}")
            if (info := self.get(p.name[: -len(_SUFFIX)])) is not None
        ]
        return sorted(found, key=lambda i: (i.model_id, i.version, i.kind, i.sha256))

    def by_manifest(self, manifest_sha256: str, kind: str = "full") -> ArchiveInfo | None:
        """A stored archive of the bundle whose manifest has this sha256."""
        for info in self.all():
            if info.manifest_sha256 == manifest_sha256 and info.kind == kind:
                return info
        return None

    def delta(self, new: ArchiveInfo, base_manifest_sha256: str) -> ArchiveInfo | None:
        """A delta of `new` for devices holding the base bundle; None when no base is stored.

        Both full archives are unpacked and verified again first: the delta carries the new
        bundle's signed manifest, and its file list must come from bytes that were checked.
        """
        if new.kind != "full":
            raise ValueError(f"a delta is built from a full archive, not {new.kind} {new.sha256}")
        if base_manifest_sha256 == new.manifest_sha256:
            return None
        existing = [
            i
            for i in self.all()
            if i.kind == "delta"
            and i.manifest_sha256 == new.manifest_sha256
            and i.base_manifest_sha256 == base_manifest_sha256
        ]
        if existing:
            return existing[0]
        base = self.by_manifest(base_manifest_sha256)
        if base is None:
            return None
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".delta-") as tmp_name:
            tmp = Path(tmp_name)
            new_dir = unpack(new.path, tmp / "new")
            base_dir = unpack(base.path, tmp / "base")
            verified = verify_bundle(new_dir, self.trusted_keys)
            verify_bundle(base_dir, self.trusted_keys)
            candidate = tmp / f"delta{_SUFFIX}"
            made = make_delta(new_dir, base_dir, candidate)
            sha, size = sha256_file(candidate)
            if sha == new.sha256 or size > new.size * MAX_DELTA_SHARE:
                # Nothing (or little) in common with the base: the delta would be the full
                # archive again, byte for byte when every file differs (same sha256, same
                # topics, another kind). Devices fetch the full archive instead.
                log.info(
                    "no delta of %s v%d on base %s: %d of %d bytes would be shipped",
                    new.model_id,
                    new.version,
                    base_manifest_sha256[:12],
                    size,
                    new.size,
                )
                return None
            info = ArchiveInfo(
                sha256=sha,
                manifest_sha256=made.manifest_sha256,
                model_id=verified.manifest.model_id,
                version=verified.manifest.version,
                size=size,
                input_shape=tuple(verified.manifest.input.shape),
                path=self._archive(sha),
                kind="delta",
                base_manifest_sha256=made.base_manifest_sha256,
            )
            self._put(candidate, info)
        log.info(
            "built delta %s of %s v%d on base %s: %d of %d bytes, files %s",
            sha[:12],
            info.model_id,
            info.version,
            base_manifest_sha256[:12],
            size,
            new.size,
            ", ".join(made.files) or "(none)",
        )
        return info

    # -- files ------------------------------------------------------------------------------

    def _archive(self, sha256: str) -> Path:
        return self.directory / f"{sha256}{_SUFFIX}"

    def _meta(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.json"

    def _put(self, candidate: Path, info: ArchiveInfo) -> None:
        """Description first, then the archive, each by an atomic rename; fsync both."""
        if self.get(info.sha256) is not None:
            return  # the same bytes are stored already
        fields = asdict(info)
        del fields["path"]  # the file's own name says where it is
        fields["input_shape"] = list(info.input_shape)
        meta_tmp = candidate.with_suffix(".json.tmp")
        with meta_tmp.open("w") as fh:
            json.dump(fields, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(meta_tmp, self._meta(info.sha256))
        with candidate.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(candidate, info.path)
        fsync_dir(self.directory)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


