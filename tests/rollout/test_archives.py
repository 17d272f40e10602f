"""The coordinator's archive store: verified on the way in, content-addressed, deltas."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import (
    BadSignature,
    HashMismatch,
    SignatureMissing,
    UnsafeArchive,
    UntrustedKey,
    generate_private_key,
    pack,
    unpack,
    verify_bundle,
    write_bundle,
)
from edgefleet.agent.bundle.delta import fill_from
from edgefleet.agent.bundle.digest import sha256_file
from edgefleet.server.rollout.archives import ArchiveStore
from tests.bundle_helpers import head_npz, two_stage_body, two_stage_files


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ArchiveStore:
    return ArchiveStore(tmp_path / "archives", [key.public_key()])


def make_bundle(root: Path, key: Ed25519PrivateKey, version: int, head_seed: int = 0) -> Path:
    """Version `version` of one model; only the exit head's weights depend on head_seed."""
    files = two_stage_files()
    if head_seed:
        files["heads/exit0.npz"] = head_npz(np.random.default_rng(head_seed))
    out = root / f"v{version}"
    write_bundle(out, two_stage_body(version=version), files, key)
    return out


def test_add_a_directory_stores_it_packed_under_its_sha256(
    tmp_path: Path, key: Ed25519PrivateKey, store: ArchiveStore
) -> None:
    bundle = make_bundle(tmp_path, key, 3)
    info = store.add(bundle)
    assert info.path == store.directory / f"{info.sha256}.tar.gz"
    assert sha256_file(info.path) == (info.sha256, info.size)
    assert (info.model_id, info.version, info.kind, info.input_shape) == (
        "tiny-cnn",
        3,
        "full",
        (1, 1, 8, 8),
    )
    assert info.manifest_sha256 == verify_bundle(bundle, [key.public_key()]).manifest_sha256
    assert store.get(info.sha256) == info
    assert store.get("0" * 64) is None and store.get("../etc") is None
    # A fresh store object over the same directory finds it (the description is on disk).
    again = ArchiveStore(store.directory, [key.public_key()])
    assert again.get(info.sha256) == info and again.all() == [info]
    # The same bundle as an archive file is the same bytes: stored once.
    archive = pack(bundle, tmp_path / "v3.tar.gz")
    assert store.add(archive) == info
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(
        [f"{info.sha256}.tar.gz", f"{info.sha256}.json"]
    )


def test_unsigned_tampered_untrusted_and_unsafe_bundles_are_refused(
    tmp_path: Path, key: Ed25519PrivateKey, store: ArchiveStore
) -> None:
    bundle = make_bundle(tmp_path, key, 3)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(bundle, unsigned)
    (unsigned / "manifest.sig").unlink()
    with pytest.raises(SignatureMissing, match=f"bundle {unsigned}: manifest.sig is missing"):
        store.add(unsigned)

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    with (tampered / "stage1.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(HashMismatch, match=r"stage1\.onnx"):
        store.add(pack(tampered, tmp_path / "tampered.tar.gz"))

    manifest = tmp_path / "bad-manifest"
    shutil.copytree(bundle, manifest)
    (manifest / "manifest.json").write_bytes((manifest / "manifest.json").read_bytes() + b" ")
    with pytest.raises(BadSignature):
        store.add(manifest)

    other = make_bundle(tmp_path / "other", generate_private_key(), 3)
    with pytest.raises(UntrustedKey, match="not trusted here"):
        store.add(other)

    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar archive")
    with pytest.raises(UnsafeArchive, match="not a readable tar archive"):
        store.add(junk)
    # Nothing refused was kept, not even a temporary file.
    assert list(store.directory.iterdir()) == []


def test_delta_ships_only_the_changed_files_and_fills_into_the_new_bundle(
    tmp_path: Path, key: Ed25519PrivateKey, store: ArchiveStore
) -> None:
    base = store.add(make_bundle(tmp_path, key, 3))
    new = store.add(make_bundle(tmp_path, key, 4, head_seed=7))
    # No base stored for an unknown manifest: no delta.
    assert store.delta(new, "f" * 64) is None
    delta = store.delta(new, base.manifest_sha256)
    assert delta is not None
    assert (delta.kind, delta.base_manifest_sha256, delta.manifest_sha256) == (
        "delta",
        base.manifest_sha256,
        new.manifest_sha256,
    )
    assert (delta.model_id, delta.version) == ("tiny-cnn", 4)
    assert delta.size < new.size  # the models are tiny; the file list below is the proof
    assert store.get(delta.sha256) == delta
    # Asking again returns the stored delta instead of building another.
    assert store.delta(new, base.manifest_sha256) == delta
    assert sorted(i.kind for i in store.all()) == ["delta", "full", "full"]

    # A device holding the base fills the delta's missing files and gets the new bundle.
    staged = unpack(delta.path, tmp_path / "staged")
    assert sorted(p.name for p in staged.rglob("*") if p.is_file()) == [
        "exit0.npz",
        "manifest.json",
        "manifest.sig",
    ]
    device_base = unpack(base.path, tmp_path / "device-base")
    assert fill_from(staged, None, [device_base]) == ["stage0.onnx", "stage1.onnx"]
    assert verify_bundle(staged, [key.public_key()]).manifest_sha256 == new.manifest_sha256


def test_no_delta_when_nothing_is_shared_and_the_full_archive_stays_intact(
    tmp_path: Path, key: Ed25519PrivateKey, store: ArchiveStore
) -> None:
    # Another model entirely: every file differs, so the "delta" would be the full archive
    # byte for byte (same sha256). It must not be recorded as a delta over the full one.
    base = store.add(make_bundle(tmp_path, key, 3))
    files = {name: bytes(reversed(data)) + b"x" for name, data in two_stage_files().items()}
    other = tmp_path / "other"
    write_bundle(other, two_stage_body(version=5), files, key)
    new = store.add(other)
    assert store.delta(new, base.manifest_sha256) is None
    assert store.get(new.sha256) == new and new.kind == "full"
    assert sorted(i.kind for i in store.all()) == ["full", "full"]
