"""check_health on real bundles: the optimizer's own, and small ones broken on purpose."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.bundle import (
    Manifest,
    ManifestBody,
    generate_private_key,
    pack,
    unpack,
    verify_bundle,
    write_bundle,
)
from edgefleet.agent.bundle.delta import fill_from, make_delta
from edgefleet.agent.hardware import device_class
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.update.health import check_health
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.golden import GOLDEN_FILE, write_bundle_with_health
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.reference import MODEL_PATH, load_reference_split, reference_preprocessing
from tests.bundle_helpers import _model, two_stage_body, two_stage_files

CLASS = device_class()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetKey:
    return init_key(tmp_path_factory.mktemp("keys"))[0]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory, fleet: FleetKey) -> Path:
    """The reference model through the real optimizer (about 15 s on two cores)."""
    work = tmp_path_factory.mktemp("opt")
    write_splits_npz(load_reference_split(), work / "data.npz")
    optimize(
        MODEL_PATH,
        work / "data.npz",
        work / "out",
        reference_preprocessing(),
        fleet,
        OptimizeOptions(latency_samples=20),
        progress=lambda _m: None,
    )
    return work / "out" / "bundle"


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


def _inputs(n: int = 8) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> Path:
    out = tmp_path_factory.mktemp("small") / "bundle"
    write_bundle_with_health(
        out, two_stage_body(), two_stage_files(), key, _inputs(), kind="validation"
    )
    return out


def _body(manifest: Manifest, **changes: object) -> ManifestBody:
    raw = manifest.model_dump(exclude={"signer", "files"})
    raw.update(changes)
    return ManifestBody.model_validate(raw)


def _files(bundle: Path, manifest: Manifest) -> dict[str, bytes | Path]:
    return {name: bundle / name for name in manifest.files}


def _check(bundle: Path, keys: list, runs: int = 10):  # type: ignore[no-untyped-def,type-arg]
    verified = verify_bundle(bundle, keys)
    return check_health(verified, threads=1, providers=None, device_class=CLASS, runs=runs)


def test_real_optimizer_bundle_is_healthy(optimized: Path, fleet: FleetKey) -> None:
    verified = verify_bundle(optimized, [fleet.public])
    health = verified.manifest.health
    assert health is not None and health.golden_kind == "validation"
    assert set(health.latency_ms) == {CLASS}
    # The golden inputs are the first validation images, preprocessed (never the test split).
    golden = np.load(io.BytesIO(verified.read(health.golden_file)))
    images = load_reference_split()["validation"][0][:8]
    expected = np.asarray(Preprocessor(reference_preprocessing()).batch(list(images)), np.float32)
    np.testing.assert_array_equal(golden["inputs"], expected)
    assert golden["probs"].shape == (8, len(verified.manifest.labels))
    report = check_health(verified, threads=1, providers=None, device_class=CLASS)
    assert report.ok, report.reason
    assert report.model is not None and report.model.manifest == verified.manifest
    assert report.checks["golden_inputs"] == 8
    assert report.checks["max_prob_diff"] == 0.0  # same host, same sessions: bit for bit
    assert report.checks["latency_min_ms"] <= report.checks["latency_limit_ms"]  # type: ignore[operator]
    other = check_health(verified, threads=1, providers=None, device_class="rpi9", runs=2)
    assert other.ok and "no latency expectation for class rpi9" in other.reason


def test_head_only_delta_of_a_real_bundle_is_a_few_kb(
    tmp_path: Path, optimized: Path, fleet: FleetKey
) -> None:
    verified = verify_bundle(optimized, [fleet.public])
    m = verified.manifest
    head = m.stages[0].exit.head_file  # type: ignore[union-attr]
    assert head is not None
    arrays = dict(np.load(io.BytesIO(verified.read(head))))
    arrays["bias"] = arrays["bias"] + np.float32(0.01)  # a federated round's update
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files = _files(optimized, m) | {head: buf.getvalue()}
    write_bundle(tmp_path / "v2", _body(m, version=m.version + 1), files, fleet.private)
    full = pack(tmp_path / "v2", tmp_path / "full.tar.gz").stat().st_size
    info = make_delta(tmp_path / "v2", optimized, tmp_path / "delta.tar.gz")
    assert info.files == (head,)
    assert info.bytes < 16384 and info.bytes * 20 < full, (info.bytes, full)
    staged = unpack(tmp_path / "delta.tar.gz", tmp_path / "staged")
    fill_from(staged, None, [optimized])
    rebuilt = verify_bundle(staged, [fleet.public])
    assert rebuilt.manifest_sha256 == info.manifest_sha256
    assert _check(staged, [fleet.public], runs=2).ok


def test_small_bundle_is_healthy(small: Path, key: Ed25519PrivateKey) -> None:
    report = _check(small, [key.public_key()])
    assert report.ok, report.reason
    assert report.checks["agreement"] == 1.0


def test_altered_weights_resigned_fail_naming_the_input(
    tmp_path: Path, small: Path, key: Ed25519PrivateKey
) -> None:
    m = verify_bundle(small, [key.public_key()]).manifest
    files = _files(small, m) | {"stage1.onnx": two_stage_files(seed=5)["stage1.onnx"]}
    write_bundle(tmp_path / "b", _body(m), files, key)  # validly signed, other weights
    report = _check(tmp_path / "b", [key.public_key()])
    assert not report.ok and report.model is None
    assert report.reason.startswith("golden input ")
    assert "probabilities differ by" in report.reason and "(atol 0.05)" in report.reason
    assert report.checks["max_prob_diff"] > 0.05  # type: ignore[operator]


def test_golden_file_with_nan_expectations_fails(
    tmp_path: Path, small: Path, key: Ed25519PrivateKey
) -> None:
    verified = verify_bundle(small, [key.public_key()])
    arrays = dict(np.load(io.BytesIO(verified.read(GOLDEN_FILE))))
    arrays["probs"][2, 1] = np.nan
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files = _files(small, verified.manifest) | {GOLDEN_FILE: buf.getvalue()}
    write_bundle(tmp_path / "b", _body(verified.manifest), files, key)
    report = _check(tmp_path / "b", [key.public_key()])
    assert not report.ok and "NaN" in report.reason and GOLDEN_FILE in report.reason


def test_impossible_latency_fails_naming_both_numbers(
    tmp_path: Path, small: Path, key: Ed25519PrivateKey
) -> None:
    m = verify_bundle(small, [key.public_key()]).manifest
    assert m.health is not None
    health = m.health.model_copy(update={"latency_ms": {CLASS: 0.0001}})
    write_bundle(tmp_path / "b", _body(m, health=health), _files(small, m), key)
    report = _check(tmp_path / "b", [key.public_key()], runs=3)
    assert not report.ok
    assert "at best over 3 runs, more than 0.00 ms" in report.reason
    assert f"(0.0001 ms measured for {CLASS} x 3)" in report.reason
    assert report.checks["latency_expected_ms"] == 0.0001


def test_without_health_section_one_zero_run(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    write_bundle(tmp_path / "b", two_stage_body(), two_stage_files(), key)
    report = _check(tmp_path / "b", [key.public_key()], runs=2)
    assert report.ok and "no golden inputs" in report.reason
    assert f"no latency expectation for class {CLASS}" in report.reason


def test_nan_output_and_unloadable_stage_fail(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    # stage1 with a NaN bias: every input gives NaN logits.
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w1")
    b = numpy_helper.from_array(np.full(3, np.nan, np.float32), "b1")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["f1"], ["g1"]),
            helper.make_node("Flatten", ["g1"], ["p1"]),
            helper.make_node("Gemm", ["p1", "w1", "b1"], ["logits"], transB=1),
        ],
        "stage1",
        [helper.make_tensor_value_info("f1", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    files = two_stage_files() | {"stage1.onnx": _model(graph)}
    write_bundle(tmp_path / "nan", two_stage_body(), files, key)
    report = _check(tmp_path / "nan", [key.public_key()], runs=1)
    assert not report.ok and report.reason == "exit 1 outputs NaN or inf"

    files = two_stage_files() | {"stage1.onnx": b"not an onnx model"}
    write_bundle(tmp_path / "junk", two_stage_body(), files, key)
    report = _check(tmp_path / "junk", [key.public_key()], runs=1)
    assert not report.ok and report.reason.startswith("does not load: ")
    assert "stage1.onnx" in report.reason and report.model is None
