"""Signed bundles: round trips, and every way a bundle is refused, with the error text."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import (
    BadSignature,
    BundleError,
    ExtraFile,
    HashMismatch,
    KeyFileError,
    MalformedManifest,
    ManifestBody,
    MissingFile,
    NotABundle,
    OperatingPoint,
    SignatureMissing,
    UnknownFormatVersion,
    UnsafeArchive,
    UntrustedKey,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    pack,
    save_private_key,
    save_public_key,
    unpack,
    verify_bundle,
    write_bundle,
)
from edgefleet.agent.bundle.keys import public_key_pem, sign
from tests.bundle_helpers import one_stage_body, stage1_model, two_stage_body, two_stage_files


def _resign(bundle: Path, key: Ed25519PrivateKey, data: bytes) -> None:
    """Replace the manifest with other bytes, correctly signed: tests what comes after the sig."""
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.sig").write_bytes(sign(key, data))


def test_signed_multistage_round_trip_runs(bundle: Path, key: Ed25519PrivateKey) -> None:
    verified = verify_bundle(bundle, [key.public_key()])
    m = verified.manifest
    assert m == verify_bundle(bundle, [key.public_key()]).manifest
    assert m.model_id == "tiny-cnn" and m.version == 3
    assert m.signer == key_id(key.public_key())
    assert sorted(m.files) == ["heads/exit0.npz", "stage0.onnx", "stage1.onnx"]
    assert m.early_exits == [0]
    assert [op.name for op in m.operating_points] == ["accurate", "fast"]
    assert m.model_dump() == two_stage_body().model_dump() | {
        "created_ts": m.created_ts,
        "signer": m.signer,
        "files": m.model_dump()["files"],
    }

    # The verified bytes load and chain: stage0 -> (f1, e0) -> stage1 -> logits.
    s0 = ort.InferenceSession(verified.read("stage0.onnx"), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(verified.read("stage1.onnx"), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    f1, e0 = s0.run(["f1", "e0"], {"image": image})
    (logits,) = s1.run(["logits"], {"f1": f1})
    head = np.load(io.BytesIO(verified.read("heads/exit0.npz")))
    assert (e0 @ head["weight"].T + head["bias"]).shape == (1, 3)
    assert logits.shape == (1, 3)


def test_one_stage_plain_model_is_a_bundle(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    rng = np.random.default_rng(0)
    write_bundle(tmp_path / "b", one_stage_body(), {"model.onnx": stage1_model(rng)}, key)
    verified = verify_bundle(tmp_path / "b", [key.public_key()])
    assert verified.manifest.early_exits == []
    assert verified.manifest.operating_points == []


def test_manifest_bytes_are_canonical(bundle: Path) -> None:
    data = (bundle / "manifest.json").read_bytes()
    assert data == (json.dumps(json.loads(data), sort_keys=True, indent=2) + "\n").encode()


def test_any_trusted_key_verifies(bundle: Path, key: Ed25519PrivateKey) -> None:
    other = generate_private_key().public_key()
    assert verify_bundle(bundle, [other, key.public_key()]).manifest.version == 3


# --- refusals -------------------------------------------------------------------------


def test_missing_file(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / "stage1.onnx").unlink()
    with pytest.raises(MissingFile, match=r"stage1\.onnx is listed in the manifest but missing"):
        verify_bundle(bundle, [key.public_key()])


def test_extra_file(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / "heads" / "evil.py").write_text("print('hi')")
    with pytest.raises(ExtraFile, match=r"heads/evil\.py is not listed in the manifest"):
        verify_bundle(bundle, [key.public_key()])


def test_symlink_is_refused(bundle: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    os.symlink(tmp_path, bundle / "link")
    with pytest.raises(ExtraFile, match="link is a symbolic link"):
        verify_bundle(bundle, [key.public_key()])


def test_wrong_hash(bundle: Path, key: Ed25519PrivateKey) -> None:
    data = bytearray((bundle / "stage0.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "stage0.onnx").write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=r"stage0\.onnx: sha256 [0-9a-f]{12}… != manifest"):
        verify_bundle(bundle, [key.public_key()])


def test_file_changed_after_verification(bundle: Path, key: Ed25519PrivateKey) -> None:
    verified = verify_bundle(bundle, [key.public_key()])
    (bundle / "stage1.onnx").write_bytes(b"swapped")
    with pytest.raises(HashMismatch, match=r"stage1\.onnx changed after verification"):
        verified.read("stage1.onnx")


def test_missing_signature(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / "manifest.sig").unlink()
    with pytest.raises(SignatureMissing, match=r"manifest\.sig is missing; unsigned bundles"):
        verify_bundle(bundle, [key.public_key()])


def test_tampered_manifest_is_bad_signature(bundle: Path, key: Ed25519PrivateKey) -> None:
    raw = json.loads((bundle / "manifest.json").read_bytes())
    raw["version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(raw, sort_keys=True, indent=2) + "\n")
    with pytest.raises(BadSignature, match=r"manifest\.sig does not match manifest\.json"):
        verify_bundle(bundle, [key.public_key()])


def test_truncated_signature(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / "manifest.sig").write_bytes((bundle / "manifest.sig").read_bytes()[:10])
    with pytest.raises(BadSignature):
        verify_bundle(bundle, [key.public_key()])


def test_wrong_key(bundle: Path, key: Ed25519PrivateKey) -> None:
    other = generate_private_key().public_key()
    with pytest.raises(UntrustedKey) as err:
        verify_bundle(bundle, [other])
    assert f"signed by key {key_id(key.public_key())}, which is not trusted here" in str(err.value)
    assert f"trusted: {key_id(other)}" in str(err.value)


def test_no_trusted_keys_refuses(bundle: Path) -> None:
    with pytest.raises(UntrustedKey, match=r"trusted: none"):
        verify_bundle(bundle, [])


def test_unknown_format_version(bundle: Path, key: Ed25519PrivateKey) -> None:
    raw = json.loads((bundle / "manifest.json").read_bytes())
    raw["format_version"] = 2
    _resign(bundle, key, json.dumps(raw).encode())
    with pytest.raises(UnknownFormatVersion, match=r"format_version 2 is not supported"):
        verify_bundle(bundle, [key.public_key()])


def test_manifest_not_json(bundle: Path, key: Ed25519PrivateKey) -> None:
    _resign(bundle, key, b"{not json")
    with pytest.raises(MalformedManifest, match=r"manifest\.json is not valid JSON"):
        verify_bundle(bundle, [key.public_key()])


def test_manifest_not_an_object(bundle: Path, key: Ed25519PrivateKey) -> None:
    _resign(bundle, key, b"[1, 2]")
    with pytest.raises(MalformedManifest, match=r"manifest\.json is not a JSON object"):
        verify_bundle(bundle, [key.public_key()])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("labels"), r"labels: Field required"),
        (lambda m: m.update(surprise=1), r"surprise: Extra inputs are not permitted"),
        (lambda m: m.update(version=0), r"version: Input should be greater than or equal to 1"),
        (
            lambda m: m["operating_points"][0].update(thresholds=[0.5, 0.5]),
            r"operating point 'accurate' has 2 thresholds for 1 early exit",
        ),
        (
            lambda m: m["files"].pop("heads/exit0.npz"),
            r"files referenced but not listed: heads/exit0\.npz",
        ),
        (
            lambda m: m["files"].update({"../escape": m["files"]["stage0.onnx"]}),
            r"file name '\.\./escape' is not a plain relative path",
        ),
        (
            lambda m: m["stages"][1].update(inputs=["nope"]),
            r"stage 1 reads \['nope'\], but stage 0 outputs \['f1'\]",
        ),
    ],
)
def test_malformed_manifest(bundle: Path, key: Ed25519PrivateKey, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads((bundle / "manifest.json").read_bytes())
    mutate(raw)
    _resign(bundle, key, json.dumps(raw).encode())
    with pytest.raises(MalformedManifest, match=message):
        verify_bundle(bundle, [key.public_key()])


def test_not_a_bundle(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(NotABundle, match="not a directory"):
        verify_bundle(tmp_path / "nowhere", [key.public_key()])
    with pytest.raises(NotABundle, match=r"manifest\.json is missing"):
        verify_bundle(tmp_path, [key.public_key()])


def test_error_names_the_bundle(bundle: Path, key: Ed25519PrivateKey) -> None:
    (bundle / "stage1.onnx").unlink()
    with pytest.raises(BundleError) as err:
        verify_bundle(bundle, [key.public_key()])
    assert str(err.value).startswith(f"bundle {bundle}: ")


# --- writer ---------------------------------------------------------------------------


def test_writer_refuses_existing_output(bundle: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match="output directory already exists"):
        write_bundle(bundle, two_stage_body(), two_stage_files(), key)


def test_writer_refuses_unreferenced_and_missing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    files = two_stage_files()
    with pytest.raises(BundleError, match=r"files given but not referenced: notes\.txt"):
        write_bundle(tmp_path / "a", two_stage_body(), {**files, "notes.txt": b"x"}, key)
    files.pop("stage1.onnx")
    with pytest.raises(BundleError, match=r"references files not given: stage1\.onnx"):
        write_bundle(tmp_path / "b", two_stage_body(), files, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_body_validation_names_the_problem() -> None:
    with pytest.raises(ValueError, match="the last stage must have an exit"):
        body = two_stage_body()
        stages = [body.stages[0], body.stages[1].model_copy(update={"exit": None})]
        ManifestBody.model_validate(
            body.model_dump() | {"stages": [s.model_dump() for s in stages]}
        )
    with pytest.raises(ValueError, match=r"threshold 1\.5 outside \[0, 1\]"):
        OperatingPoint(name="x", thresholds=[1.5])


# --- archive --------------------------------------------------------------------------


def test_archive_round_trip_is_deterministic(
    bundle: Path, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    a, b = pack(bundle, tmp_path / "a.tar.gz"), pack(bundle, tmp_path / "b.tar.gz")
    assert a.read_bytes() == b.read_bytes()
    out = unpack(a, tmp_path / "unpacked")
    assert verify_bundle(out, [key.public_key()]).manifest.version == 3


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return path


def test_archive_path_traversal_refused(tmp_path: Path) -> None:
    archive = _tar_with(tmp_path, tarfile.TarInfo("../../etc/passwd"), b"root")
    with pytest.raises(UnsafeArchive, match="would escape the bundle directory"):
        unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_archive_symlink_member_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("manifest.json")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(UnsafeArchive, match=r"member 'manifest\.json' is a symbolic link"):
        unpack(_tar_with(tmp_path, link), tmp_path / "out")


def test_archive_garbage_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UnsafeArchive, match="not a readable tar archive"):
        unpack(tmp_path / "junk.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- keys -----------------------------------------------------------------------------


def test_private_key_file_is_0600_and_not_overwritten(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    path = tmp_path / "keys" / "fleet.key"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        save_private_key(generate_private_key(), path)


def test_public_key_pem_and_base64(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization

    save_public_key(key.public_key(), tmp_path / "fleet.pub")
    assert key_id(load_public_key(tmp_path / "fleet.pub")) == key_id(key.public_key())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "fleet.b64").write_bytes(base64.b64encode(raw) + b"\n")
    assert key_id(load_public_key(tmp_path / "fleet.b64")) == key_id(key.public_key())
    assert public_key_pem(key.public_key()).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"missing\.key: cannot read private key"):
        load_private_key(tmp_path / "missing.key")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(KeyFileError, match=r"junk\.pub: not an Ed25519 public key"):
        load_public_key(tmp_path / "junk.pub")
    (tmp_path / "junk.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(KeyFileError, match=r"junk\.key: not a PEM private key"):
        load_private_key(tmp_path / "junk.key")
