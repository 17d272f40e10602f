"""Delta bundles: ship only the files a device does not already hold, by content.

A delta is an ordinary bundle archive (archive.pack's format) holding `manifest.json`,
`manifest.sig` and only the files whose sha256 no file of the base bundle has. The device
unpacks it, fills the missing files from any installed bundle holding the same bytes (content
addressing: same sha256, whatever the name) and then verifies the result with the normal
`verify_bundle`: a filled delta is trusted exactly as much as a full bundle, no more.

Before verification the staged manifest is unsigned data. It is parsed here with the
verifier's strict JSON loader and size limit and used only for names (which must pass
`check_file_name`) and hashes to copy; every copied file is hashed while it is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .archive import pack
from .digest import sha256_bytes
from .errors import BundleError, MalformedManifest, NotABundle
from .loader import MAX_MANIFEST_BYTES
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, check_file_name
from .strict_json import DuplicateKey, loads_unique

_CHUNK = 1 << 20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class DeltaBaseMissing(BundleError):
    """A delta needs a file that no installed bundle holds."""


@dataclass(frozen=True)
class DeltaInfo:
    """What make_delta wrote: which bundle it applies on, what it carries, how big it is."""

    base_manifest_sha256: str
    manifest_sha256: str
    files: tuple[str, ...]
    bytes: int


def read_manifest_bytes(bundle_dir: Path) -> bytes:
    """manifest.json's bytes, refusing a link or anything over the verifier's size limit."""
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except FileNotFoundError as exc:
        raise NotABundle(bundle_dir, f"{MANIFEST_NAME} is missing") from exc
    except OSError as exc:
        raise NotABundle(bundle_dir, f"{MANIFEST_NAME} cannot be read: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise MalformedManifest(bundle_dir, f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES}")
    return data


def unverified_files(bundle_dir: Path) -> dict[str, FileEntry]:
    """The `files` table of a manifest that is NOT yet verified: names and hashes only."""
    data = read_manifest_bytes(bundle_dir)
    try:
        raw = loads_unique(data)
    except (DuplicateKey, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedManifest(bundle_dir, f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    table = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise MalformedManifest(bundle_dir, f"{MANIFEST_NAME} has no 'files' object")
    out: dict[str, FileEntry] = {}
    for name, entry in table.items():
        try:
            check_file_name(name)
            out[name] = FileEntry.model_validate(entry)
        except (ValueError, ValidationError) as exc:
            raise MalformedManifest(bundle_dir, f"{MANIFEST_NAME}: files[{name!r}]: {exc}") from exc
    return out


def make_delta(new_dir: Path, base_dir: Path, out_archive: Path) -> DeltaInfo:
    """Pack new_dir's manifest, signature and the files whose bytes base_dir does not hold."""
    new_dir, base_dir = Path(new_dir), Path(base_dir)
    new_files = unverified_files(new_dir)
    base_hashes = {e.sha256 for e in unverified_files(base_dir).values()}
    shipped = tuple(sorted(n for n, e in new_files.items() if e.sha256 not in base_hashes))
    pack(new_dir, out_archive, only={MANIFEST_NAME, SIGNATURE_NAME, *shipped})
    return DeltaInfo(
        base_manifest_sha256=sha256_bytes(read_manifest_bytes(base_dir)),
        manifest_sha256=sha256_bytes(read_manifest_bytes(new_dir)),
        files=shipped,
        bytes=out_archive.stat().st_size,
    )


def _index(sources: Sequence[Path]) -> dict[str, list[tuple[Path, str]]]:
    """sha256 -> [(source bundle, name)] over every readable source manifest."""
    index: dict[str, list[tuple[Path, str]]] = {}
    for src in sources:
        try:
            table = unverified_files(src)
        except BundleError:
            continue  # a broken source offers nothing; the copy check would refuse it anyway
        for name, entry in table.items():
            index.setdefault(entry.sha256, []).append((Path(src), name))
    return index


def _copy_checked(src: Path, target: Path, entry: FileEntry) -> bool:
    """Copy src to the new file target if its bytes hash to entry; False (nothing left) if not."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except OSError:
        return False
    h = hashlib.sha256()
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with os.fdopen(fd, "rb") as source, target.open("xb") as out:
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > entry.size:
                    break
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError:
        target.unlink(missing_ok=True)
        return False
    if size != entry.size or h.hexdigest() != entry.sha256:
        target.unlink(missing_ok=True)
        return False
    return True


def fill_from(
    staged_dir: Path,
    manifest: Manifest | Mapping[str, FileEntry] | None,
    sources: Sequence[Path],
) -> list[str]:
    """Copy every listed-but-absent file of staged_dir from a source bundle with its bytes.

    `manifest` is the staged manifest (or its files table); None reads staged_dir's own
    manifest with the strict loader. Returns the names filled, in order; raises
    DeltaBaseMissing naming the first file no source holds. The caller then runs
    verify_bundle on staged_dir.
    """
    staged_dir = Path(staged_dir)
    if manifest is None:
        files: Mapping[str, FileEntry] = unverified_files(staged_dir)
    elif isinstance(manifest, Manifest):
        files = manifest.files
    else:
        files = manifest
    missing = []
    for name in sorted(files):
        try:
            check_file_name(name)
        except ValueError as exc:
            raise MalformedManifest(staged_dir, f"{MANIFEST_NAME}: {exc}") from exc
        if not os.path.lexists(staged_dir / name):
            missing.append(name)
    if not missing:
        return []
    index = _index(sources)
    filled: list[str] = []
    for name in missing:
        entry = files[name]
        if not any(
            _copy_checked(src / src_name, staged_dir / name, entry)
            for src, src_name in index.get(entry.sha256, [])
        ):
            raise DeltaBaseMissing(
                staged_dir,
                f"delta needs {name} (sha256 {entry.sha256[:12]}…), which no installed bundle has",
            )
        filled.append(name)
    return filled
