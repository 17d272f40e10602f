"""Write a signed bundle directory atomically (used by the coordinator's optimizer)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.durable import fsync_dir

from .digest import sha256_file
from .errors import BundleError
from .keys import key_id, sign
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest, ManifestBody


def manifest_bytes(manifest: Manifest) -> bytes:
    """The canonical bytes that are signed: sorted keys, two-space indent, trailing newline."""
    raw = manifest.model_dump(mode="json")
    # Without a health section the bytes stay what they were before the field existed, so an
    # older agent (extra="forbid") still reads a bundle that does not use it.
    if raw.get("health") is None:
        raw.pop("health", None)
    return (json.dumps(raw, sort_keys=True, indent=2) + "\n").encode()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bundle(
    out_dir: Path,
    body: ManifestBody,
    files: Mapping[str, bytes | Path],
    key: Ed25519PrivateKey,
) -> Manifest:
    """Hash the files, complete and sign the manifest, and publish out_dir atomically.

    Everything is written to a temporary sibling directory and renamed into place, so
    out_dir either does not exist or holds a complete, signed bundle.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BundleError(out_dir, "output directory already exists; refusing to overwrite")
    referenced = set(body.referenced_files())
    unreferenced = sorted(set(files) - referenced)
    missing = sorted(referenced - set(files))
    if missing:
        raise BundleError(out_dir, f"manifest references files not given: {', '.join(missing)}")
    if unreferenced:
        raise BundleError(out_dir, f"files given but not referenced: {', '.join(unreferenced)}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        entries: dict[str, FileEntry] = {}
        for name in sorted(files):
            src = files[name]
            dst = tmp / name
            if isinstance(src, Path):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                with dst.open("rb+") as fh:
                    os.fsync(fh.fileno())
            else:
                _write_file(dst, src)
            digest, size = sha256_file(dst)
            entries[name] = FileEntry(sha256=digest, size=size)
        manifest = Manifest.model_validate(
            {
                **body.model_dump(mode="python"),
                "signer": key_id(key.public_key()),
                "files": entries,
            }
        )
        data = manifest_bytes(manifest)
        _write_file(tmp / MANIFEST_NAME, data)
        _write_file(tmp / SIGNATURE_NAME, sign(key, data))
        for sub in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):
            fsync_dir(sub)
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
