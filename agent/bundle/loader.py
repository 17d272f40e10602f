"""Verify a bundle directory completely before anything in it is loaded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from .digest import sha256_file
from .errors import (
    BadSignature,
    ExtraFile,
    HashMismatch,
    MalformedManifest,
    MissingFile,
    NotABundle,
    SignatureMissing,
    UnknownFormatVersion,
    UntrustedKey,
)
from .keys import key_id, verify
from .manifest import FORMAT_VERSION, MANIFEST_NAME, RESERVED_NAMES, SIGNATURE_NAME, Manifest
from .strict_json import DuplicateKey, loads_unique
from .tree import plain_tree

MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every file hash have been checked."""

    path: Path
    manifest: Manifest
    manifest_sha256: str

    def read(self, name: str) -> bytes:
        """Read a listed file and check its hash again, so what is loaded is what was verified."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise MissingFile(self.path, f"{name} is not listed in the manifest")
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError as exc:
            raise MissingFile(self.path, f"{name} listed in the manifest is missing") from exc
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise HashMismatch(self.path, f"{name} changed after verification")
        return data


def _format_validation(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{MANIFEST_NAME}: {where}: {first['msg']}{more}"


def verify_bundle(path: Path, trusted_keys: Iterable[Ed25519PublicKey]) -> VerifiedBundle:
    """Check signature, format, schema and every file's hash; raise a precise BundleError."""
    path = Path(path)
    keys = list(trusted_keys)
    if not path.is_dir():
        raise NotABundle(path, "not a directory")
    # Links and special files are refused before anything is read (tree.py: the one rule), so
    # a manifest.json linked to a file elsewhere is never opened.
    tree = plain_tree(path)
    manifest_path, sig_path = path / MANIFEST_NAME, path / SIGNATURE_NAME
    if not manifest_path.is_file():
        raise NotABundle(path, f"{MANIFEST_NAME} is missing")
    if not sig_path.is_file():
        raise SignatureMissing(path, f"{SIGNATURE_NAME} is missing; unsigned bundles are refused")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MalformedManifest(path, f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    data = manifest_path.read_bytes()
    signature = sig_path.read_bytes()

    # The signature is checked before the manifest is trusted for anything.
    if not any(verify(k, signature, data) for k in keys):
        signer = _claimed_signer(data)
        trusted = sorted(key_id(k) for k in keys)
        if signer is not None and signer not in trusted:
            raise UntrustedKey(
                path,
                f"signed by key {signer}, which is not trusted here "
                f"(trusted: {', '.join(trusted) or 'none'})",
            )
        raise BadSignature(
            path, f"{SIGNATURE_NAME} does not match {MANIFEST_NAME} (tampered or corrupt)"
        )

    try:
        raw = loads_unique(data)
    except DuplicateKey as exc:
        raise MalformedManifest(path, f"{MANIFEST_NAME}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedManifest(path, f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedManifest(path, f"{MANIFEST_NAME} is not a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise UnknownFormatVersion(
            path, f"format_version {version!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise MalformedManifest(path, _format_validation(exc)) from exc

    present = set(tree.files) - RESERVED_NAMES
    for name in sorted(manifest.files):
        if name not in present:
            raise MissingFile(path, f"{name} is listed in the manifest but missing")
    extra = sorted(present - set(manifest.files))
    if extra:
        raise ExtraFile(path, f"{extra[0]} is not listed in the manifest")
    for name, entry in sorted(manifest.files.items()):
        digest, size = sha256_file(path / name)
        if digest != entry.sha256 or size != entry.size:
            raise HashMismatch(
                path, f"{name}: sha256 {digest[:12]}… != manifest {entry.sha256[:12]}…"
            )
    return VerifiedBundle(path, manifest, hashlib.sha256(data).hexdigest())


def _claimed_signer(data: bytes) -> str | None:
    """The manifest's own claim of its signer, used only to word an error message."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    signer = raw.get("signer") if isinstance(raw, dict) else None
    return signer if isinstance(signer, str) else None
