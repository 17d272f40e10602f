"""Delta bundles: only the changed files travel; the device fills the rest by content."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import (
    BadSignature,
    HashMismatch,
    MalformedManifest,
    UntrustedKey,
    generate_private_key,
    pack,
    unpack,
    verify_bundle,
)
from edgefleet.agent.bundle.delta import DeltaBaseMissing, fill_from, make_delta
from tests.update.bundles import write_version


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def v3(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    write_version(tmp_path / "v3", key, 3)
    return tmp_path / "v3"


@pytest.fixture
def v4(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    write_version(tmp_path / "v4", key, 4)
    return tmp_path / "v4"


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_head_only_delta_is_small_and_rebuilds_an_identical_bundle(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path, v4: Path
) -> None:
    full = pack(v4, tmp_path / "full.tar.gz")
    info = make_delta(v4, v3, tmp_path / "delta.tar.gz")
    assert info.files == ("heads/exit0.npz",)
    assert info.bytes == (tmp_path / "delta.tar.gz").stat().st_size
    assert info.bytes < min(4096, full.stat().st_size)
    assert info.manifest_sha256 == hashlib.sha256((v4 / "manifest.json").read_bytes()).hexdigest()
    assert (
        info.base_manifest_sha256 == hashlib.sha256((v3 / "manifest.json").read_bytes()).hexdigest()
    )
    # Same input, same bytes: the archive's sha256 names its content.
    again = make_delta(v4, v3, tmp_path / "delta2.tar.gz")
    assert (tmp_path / "delta.tar.gz").read_bytes() == (tmp_path / "delta2.tar.gz").read_bytes()
    assert again == info

    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    assert sorted(_files(staged)) == ["heads/exit0.npz", "manifest.json", "manifest.sig"]
    filled = fill_from(staged, None, [v3])
    assert filled == ["stage0.onnx", "stage1.onnx"]
    verified = verify_bundle(staged, [key.public_key()])
    assert _files(staged) == _files(v4)
    assert verified.manifest.version == 4


def test_fill_copies_by_content_whatever_the_name(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path, v4: Path
) -> None:
    make_delta(v4, v3, tmp_path / "delta.tar.gz")
    # A source holding stage0's bytes under another name, and stage1 under its own.
    src = tmp_path / "renamed"
    (src / "x").mkdir(parents=True)
    (src / "x" / "blob.bin").write_bytes((v3 / "stage0.onnx").read_bytes())
    (src / "stage1.onnx").write_bytes((v3 / "stage1.onnx").read_bytes())
    table = {
        "x/blob.bin": _entry(v3 / "stage0.onnx"),
        "stage1.onnx": _entry(v3 / "stage1.onnx"),
    }
    (src / "manifest.json").write_text(json.dumps({"files": table}))
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    assert fill_from(staged, verify_manifest_files(v4), [src]) == ["stage0.onnx", "stage1.onnx"]
    verify_bundle(staged, [key.public_key()])


def _entry(path: Path) -> dict[str, object]:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": path.stat().st_size}


def verify_manifest_files(bundle: Path) -> dict:  # type: ignore[type-arg]
    from edgefleet.agent.bundle.delta import unverified_files

    return unverified_files(bundle)


def test_delta_without_its_base_names_the_missing_file(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path, v4: Path
) -> None:
    make_delta(v4, v3, tmp_path / "delta.tar.gz")
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(
        DeltaBaseMissing,
        match=r"delta needs stage0\.onnx \(sha256 [0-9a-f]{12}…\), which no installed bundle has",
    ):
        fill_from(staged, None, [other, tmp_path / "absent"])


def test_a_source_whose_file_lies_about_its_hash_is_not_used(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path, v4: Path
) -> None:
    make_delta(v4, v3, tmp_path / "delta.tar.gz")
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    liar = tmp_path / "liar"
    liar.mkdir()
    for name in ("manifest.json", "stage0.onnx", "stage1.onnx"):
        (liar / name).write_bytes((v3 / name).read_bytes())
    with (liar / "stage0.onnx").open("r+b") as fh:
        fh.seek(40)
        fh.write(b"\xff")
    # The liar comes first; its stage0 fails the hash check while copied and v3's is used.
    assert fill_from(staged, None, [liar, v3]) == ["stage0.onnx", "stage1.onnx"]
    verify_bundle(staged, [key.public_key()])
    staged2 = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged2")
    with pytest.raises(DeltaBaseMissing, match=r"stage0\.onnx"):
        fill_from(staged2, None, [liar])
    assert not (staged2 / "stage0.onnx").exists()


def test_tampered_delta_is_refused_by_verify(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path, v4: Path
) -> None:
    make_delta(v4, v3, tmp_path / "delta.tar.gz")
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    head = staged / "heads" / "exit0.npz"
    data = bytearray(head.read_bytes())
    data[len(data) // 2] ^= 0x01
    head.write_bytes(bytes(data))
    fill_from(staged, None, [v3])
    with pytest.raises(HashMismatch, match=r"heads/exit0\.npz"):
        verify_bundle(staged, [key.public_key()])


def test_delta_resigned_with_another_key_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path
) -> None:
    rogue = generate_private_key()
    write_version(tmp_path / "rogue", rogue, 4)
    make_delta(tmp_path / "rogue", v3, tmp_path / "delta.tar.gz")
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    fill_from(staged, None, [v3])
    with pytest.raises(UntrustedKey):
        verify_bundle(staged, [key.public_key()])


def test_delta_with_an_edited_manifest_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, v3: Path, v4: Path
) -> None:
    make_delta(v4, v3, tmp_path / "delta.tar.gz")
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    manifest = staged / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version": 4', b'"version": 9'))
    fill_from(staged, None, [v3])
    with pytest.raises(BadSignature):
        verify_bundle(staged, [key.public_key()])


def test_unverified_manifest_names_must_be_plain(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    escape = {"files": {"../escape": {"sha256": "a" * 64, "size": 1}}}
    (staged / "manifest.json").write_text(json.dumps(escape))
    with pytest.raises(MalformedManifest, match="escape"):
        fill_from(staged, None, [])
    (staged / "manifest.json").write_text('{"files": {}, "files": {}}')
    with pytest.raises(MalformedManifest, match="twice"):
        fill_from(staged, None, [])
    (staged / "manifest.json").write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(MalformedManifest, match="larger"):
        fill_from(staged, None, [])
    os.unlink(staged / "manifest.json")
    with pytest.raises(Exception, match=r"manifest\.json is missing"):
        fill_from(staged, None, [])
