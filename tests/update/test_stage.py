"""stage_archive: unpack, fill a delta, verify, check the sha, move into place; or nothing."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import (
    BundleError,
    HashMismatch,
    UnsafeArchive,
    UntrustedKey,
    generate_private_key,
    pack,
)
from edgefleet.agent.bundle.delta import DeltaBaseMissing, make_delta
from edgefleet.agent.update.slots import Slots
from edgefleet.agent.update.stage import ManifestMismatch, stage_archive, stage_dir
from tests.update.bundles import write_version


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> Path:
    root = tmp_path_factory.mktemp("src")
    write_version(root / "v3", key, 3)
    write_version(root / "v4", key, 4)
    pack(root / "v4", root / "v4.tar.gz")
    make_delta(root / "v4", root / "v3", root / "v4-delta.tar.gz")
    return root


def _sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.fixture
def slots(tmp_path: Path, key: Ed25519PrivateKey, src: Path) -> Slots:
    slots = Slots(tmp_path / "bundles")
    v3 = stage_dir(src / "v3", slots=slots, trusted_keys=[key.public_key()])
    slots.activate(v3.path, trial=False)
    return slots


def _leftovers(slots: Slots) -> list[str]:
    return [p.name for p in slots.dir.iterdir() if p.name.startswith(".")]


def test_full_archive_is_staged_not_activated(
    slots: Slots, key: Ed25519PrivateKey, src: Path
) -> None:
    before = slots.current()
    verified = stage_archive(
        src / "v4.tar.gz", slots, [], [key.public_key()], expect_manifest_sha256=_sha(src / "v4")
    )
    assert verified.path.parent == slots.dir and verified.manifest.version == 4
    assert verified.path.name == f"tiny-cnn-v4-{_sha(src / 'v4')[:12]}"
    assert slots.current() == before and _leftovers(slots) == []


def test_delta_is_filled_from_installed_bundles(
    slots: Slots, key: Ed25519PrivateKey, src: Path
) -> None:
    sources = [b.dir for b in slots.installed()]
    verified = stage_archive(
        src / "v4-delta.tar.gz",
        slots,
        sources,
        [key.public_key()],
        expect_manifest_sha256=_sha(src / "v4"),
    )
    for name in ("stage0.onnx", "stage1.onnx", "heads/exit0.npz"):
        assert (verified.path / name).read_bytes() == (src / "v4" / name).read_bytes()


def test_delta_without_base_fails_and_leaves_nothing(
    slots: Slots, key: Ed25519PrivateKey, src: Path
) -> None:
    with pytest.raises(DeltaBaseMissing, match=r"delta needs stage0\.onnx"):
        stage_archive(
            src / "v4-delta.tar.gz",
            slots,
            [],
            [key.public_key()],
            expect_manifest_sha256=_sha(src / "v4"),
        )
    assert _leftovers(slots) == [] and len(slots.installed()) == 1


def test_wrong_bundle_is_refused_before_anything_is_copied(
    slots: Slots, key: Ed25519PrivateKey, src: Path
) -> None:
    with pytest.raises(ManifestMismatch, match="is not the expected"):
        stage_archive(
            src / "v4.tar.gz", slots, [], [key.public_key()], expect_manifest_sha256="0" * 64
        )
    assert _leftovers(slots) == []


def test_untrusted_or_tampered_or_broken_archives_are_refused(
    tmp_path: Path, slots: Slots, key: Ed25519PrivateKey, src: Path
) -> None:
    sha = _sha(src / "v4")
    with pytest.raises(UntrustedKey):
        stage_archive(
            src / "v4.tar.gz",
            slots,
            [],
            [generate_private_key().public_key()],
            expect_manifest_sha256=sha,
        )
    # One byte of a shipped file changed, the archive otherwise intact.
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(src / "v4.tar.gz") as tin, tarfile.open(tampered, "w:gz") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "stage1.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            tout.addfile(member, io.BytesIO(data))
    with pytest.raises(HashMismatch, match=r"stage1\.onnx"):
        stage_archive(tampered, slots, [], [key.public_key()], expect_manifest_sha256=sha)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(UnsafeArchive):
        stage_archive(junk, slots, [], [key.public_key()], expect_manifest_sha256=sha)
    with pytest.raises(BundleError):
        stage_archive(
            tmp_path / "absent.tar.gz", slots, [], [key.public_key()], expect_manifest_sha256=sha
        )
    assert _leftovers(slots) == [] and len(slots.installed()) == 1
