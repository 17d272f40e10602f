"""A round's result as a bundle: the base with new exit heads, version + 1, nothing else.

Signed when the coordinator holds the fleet's signing key (written with write_bundle, the
way the optimizer writes bundles). Without the key the candidate is written unsigned: every
file plus `manifest.body.json` (the manifest without hashes and signer), which `edgefleet fl
sign` turns into a signed bundle where the key is, and `edgefleet deploy` rolls out.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import BundleError, Manifest, ManifestBody, write_bundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.federated.wire import split_heads
from edgefleet.server.federated.base import BaseBundle

BODY_NAME = "manifest.body.json"


def new_heads(base: BaseBundle, delta: Mapping[str, npt.NDArray[Any]]) -> dict[int, HeadWeights]:
    """Base head + aggregated delta, per trained exit (float32, as the bundle stores heads)."""
    return {k: base.head(k).apply(parts) for k, parts in sorted(split_heads(delta).items())}


def candidate_body(
    base: BaseBundle,
    *,
    created_ts: float,
    provenance: Mapping[str, str | int | float | bool | None],
    extra_metrics: Mapping[str, float] | None = None,
) -> ManifestBody:
    """The base manifest with version + 1, a new creation time and the round in provenance."""
    raw = base.manifest.model_dump(mode="python", exclude={"signer", "files"})
    raw["version"] = base.manifest.version + 1
    raw["created_ts"] = created_ts
    raw["provenance"]["optimizer"] = {**raw["provenance"]["optimizer"], **provenance}
    if extra_metrics:
        raw["metrics"]["extra"] = {**raw["metrics"]["extra"], **extra_metrics}
    return ManifestBody.model_validate(raw)


def candidate_files(base: BaseBundle, heads: Mapping[int, HeadWeights]) -> dict[str, bytes | Path]:
    """Every file of the base (by path, not read into memory) with the new heads' bytes."""
    files: dict[str, bytes | Path] = {
        name: base.verified.path / name for name in base.manifest.files
    }
    for k, head in heads.items():
        files[base.head_file(k)] = head.to_npz_bytes()
    return files


def write_signed(
    out: Path, body: ManifestBody, files: Mapping[str, bytes | Path], key: Ed25519PrivateKey
) -> Manifest:
    """A complete signed bundle at out (atomic: out exists only once complete)."""
    return write_bundle(out, body, files, key)


def write_unsigned(out: Path, body: ManifestBody, files: Mapping[str, bytes | Path]) -> Path:
    """The candidate without signature: its files and manifest.body.json, renamed into place."""
    out = Path(out)
    if out.exists():
        raise BundleError(out, "output directory already exists; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for name, src in files.items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, Path):
                shutil.copyfile(src, dst)
            else:
                dst.write_bytes(src)
        (tmp / BODY_NAME).write_text(
            json.dumps(body.model_dump(mode="json"), sort_keys=True, indent=2) + "\n"
        )
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sign_candidate(candidate: Path, out: Path, key: Ed25519PrivateKey) -> Manifest:
    """Sign an unsigned candidate (write_unsigned) into a bundle at out."""
    candidate = Path(candidate)
    try:
        body = ManifestBody.model_validate_json((candidate / BODY_NAME).read_bytes())
    except FileNotFoundError:
        raise BundleError(candidate, f"no {BODY_NAME}: not an unsigned round candidate") from None
    except ValueError as exc:
        raise BundleError(candidate, f"{BODY_NAME}: {exc}") from None
    files: dict[str, bytes | Path] = {}
    for name in body.referenced_files():
        path = candidate / name
        if not path.is_file():
            raise BundleError(candidate, f"{name} named by {BODY_NAME} is missing")
        files[name] = path
    return write_bundle(out, body, files, key)
