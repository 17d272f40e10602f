"""check_health on detect bundles: the golden writer's own, and ones broken on purpose."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.bundle import MANIFEST_NAME, manifest_bytes, verify_bundle, write_bundle
from edgefleet.agent.bundle.manifest import HealthSpec
from edgefleet.agent.hardware import device_class
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.update.health import HealthReport, check_health
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.detect.golden import GOLDEN_FILE
from tests.detect_agent.helpers import cell_model, detect_body

from .helpers import corrupted, golden_inputs, good, rewritten

CLASS = device_class()


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> FleetKey:
    return init_key(tmp_path_factory.mktemp("keys"))[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, key: FleetKey) -> Path:
    return good(tmp_path_factory.mktemp("good"), key, 1)


def _check(path: Path, key: FleetKey, runs: int = 3) -> HealthReport:
    verified = verify_bundle(path, [key.public])
    return check_health(verified, threads=1, providers=None, device_class=CLASS, runs=runs)


def _golden(path: Path) -> dict[str, np.ndarray]:
    return dict(np.load(io.BytesIO((path / GOLDEN_FILE).read_bytes()), allow_pickle=False))


def test_the_golden_file_holds_the_decoded_boxes_in_input_pixels(bundle: Path) -> None:
    g = _golden(bundle)
    np.testing.assert_array_equal(g["inputs"], golden_inputs())
    # Input 0: the square on cell (1, 2); input 1: cells (0, 0) at 0.9 and (3, 3) at 0.52;
    # input 2 (0.3, below the 0.5 threshold) and input 3 (blank) have none.
    np.testing.assert_array_equal(
        g["boxes"], np.array([[16, 8, 24, 16], [0, 0, 8, 8], [24, 24, 32, 32]], np.float32)
    )
    np.testing.assert_allclose(g["scores"], [1.0, 0.9, 0.52], atol=1e-6)
    assert g["classes"].tolist() == [0, 0, 0] and g["classes"].dtype == np.int64
    assert g["image_index"].tolist() == [0, 1, 1] and g["image_index"].dtype == np.int64
    assert g["boxes"].dtype == np.float32 and g["scores"].dtype == np.float32


def test_the_writers_own_detect_bundle_is_healthy(bundle: Path, key: FleetKey) -> None:
    m = verify_bundle(bundle, [key.public]).manifest
    assert m.task == "detect" and m.health is not None
    assert m.health.min_iou == 0.8 and set(m.health.latency_ms) == {CLASS}
    report = _check(bundle, key)
    assert report.ok, report.reason
    assert isinstance(report.model, DetectorModel) and report.model.manifest == m
    c = report.checks
    assert c["task"] == "detect" and c["golden_inputs"] == 4 and c["golden_boxes"] == 3
    assert c["matched_boxes"] == 3 and c["excused"] == 0 and c["box_failures"] == 0
    assert c["worst_iou"] == 1.0 and c["max_score_diff"] == 0.0  # same host: bit for bit
    assert c["latency_min_ms"] <= c["latency_limit_ms"]  # type: ignore[operator]


def test_moved_boxes_fail_naming_input_class_box_and_iou(tmp_path: Path, key: FleetKey) -> None:
    report = _check(corrupted(tmp_path, key, 2, dx=4.0), key)
    assert not report.ok
    # Moved half a cell: 8x8 boxes overlapping 4x8 have IoU 32 / 96.
    assert report.reason.startswith(
        "golden input 0: class 'square' golden box [16.0, 8.0, 24.0, 16.0] score 1.000: "
        "best match [20.0, 8.0, 28.0, 16.0] at IoU 0.333 (min 0.8)"
    ), report.reason
    # Each golden box above threshold + atol is lost and the moved boxes are new: 2 + 2;
    # the 0.52 box is excused and its moved copy is within atol of the threshold.
    assert report.reason.endswith("(and 3 more)"), report.reason
    assert report.checks["box_failures"] == 4 and report.checks["excused"] == 1
    assert report.model is None


def test_a_fraction_of_a_pixel_is_within_tolerance(tmp_path: Path, key: FleetKey) -> None:
    # What INT8 kernels on another CPU may do: edges move by a fraction of a pixel.
    report = _check(corrupted(tmp_path, key, 2, dx=0.25), key)
    assert report.ok, report.reason
    assert 0.8 < report.checks["worst_iou"] < 1.0  # type: ignore[operator]


def test_nan_outputs_fail(tmp_path: Path, key: FleetKey, bundle: Path) -> None:
    g = _golden(bundle)
    g["inputs"][2, 0, 0, 0] = np.nan  # the pooled cell's score turns NaN
    buf = io.BytesIO()
    np.savez(buf, **g)  # type: ignore[arg-type]
    report = _check(rewritten(bundle, tmp_path / "nan", key, {GOLDEN_FILE: buf.getvalue()}), key)
    assert not report.ok and report.reason == "golden input 2: output 'boxes' holds NaN or inf"


@pytest.mark.parametrize(
    ("edit", "want"),
    [
        (lambda g: g.pop("boxes"), "golden file golden.npz unreadable"),
        (lambda g: g.update(classes=g["classes"] + 1), "a class index outside 0..0"),
        (lambda g: g.update(image_index=g["image_index"] + 3), "an image_index outside 0..3"),
        (lambda g: g.update(scores=g["scores"][:2]), "are not M boxes"),
    ],
)
def test_a_malformed_golden_file_fails(
    tmp_path: Path, key: FleetKey, bundle: Path, edit: object, want: str
) -> None:
    g = _golden(bundle)
    edit(g)  # type: ignore[operator]
    buf = io.BytesIO()
    np.savez(buf, **g)  # type: ignore[arg-type]
    report = _check(rewritten(bundle, tmp_path / "bad", key, {GOLDEN_FILE: buf.getvalue()}), key)
    assert not report.ok and want in report.reason, report.reason


def test_a_detector_far_slower_than_measured_fails(
    tmp_path: Path, key: FleetKey, bundle: Path
) -> None:
    health = json.loads((bundle / MANIFEST_NAME).read_bytes())["health"]
    # 1 ns expected: no machine runs a frame in 3 ns, however fast.
    health["latency_ms"] = {CLASS: 1e-6}
    report = _check(rewritten(bundle, tmp_path / "slow", key, health=health), key, runs=2)
    assert not report.ok and "ms per frame at best over 2 runs" in report.reason, report.reason
    assert report.checks["latency_expected_ms"] == 1e-6


def test_a_detect_bundle_without_golden_is_checked_on_zeros(tmp_path: Path, key: FleetKey) -> None:
    write_bundle(tmp_path / "plain", detect_body(), {"model.onnx": cell_model()}, key.private)
    report = _check(tmp_path / "plain", key)
    assert report.ok and "no golden inputs" in report.reason, report.reason
    assert isinstance(report.model, DetectorModel)


def test_min_iou_stays_out_of_a_classifiers_manifest_bytes(bundle: Path, key: FleetKey) -> None:
    # Older agents (extra="forbid") read a classifier's health section written today.
    classifier = HealthSpec(golden_file="golden.npz", latency_ms={"x": 1.0})
    assert "min_iou" not in classifier.model_dump(mode="json")
    assert "min_iou" not in json.dumps(classifier.model_dump())
    m = verify_bundle(bundle, [key.public]).manifest
    raw = json.loads(manifest_bytes(m))
    assert raw["health"]["min_iou"] == 0.8
    assert manifest_bytes(m) == (bundle / MANIFEST_NAME).read_bytes()
