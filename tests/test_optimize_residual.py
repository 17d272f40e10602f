"""`edgefleet optimize` on a second, residual model (tinted RGB sklearn digits, real labels).

The model (`server/reference/digits_resnet.onnx`, trained by `training.digits_resnet`)
has an identity skip and a strided 1x1 projection skip, so the optimizer must cut only where
no skip crosses, prune whole residual channel groups, and read RGB through the agent's
preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet.agent.bundle import Preprocessing, verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.optimize.prepare import prepare_model
from edgefleet.server.optimize.split import articulation_tensors
from edgefleet.server.reference.digits_data import (
    DIGITS_RESNET_CARD_PATH,
    DIGITS_RESNET_PATH,
    DIGITS_SPLIT_SIZES,
    digits_preprocessing,
    digits_rgb_splits,
)

SPEC = Preprocessing(height=32, width=32, color="RGB", mean=[0.5] * 3, std=[0.5] * 3)
FAST = {"latency_samples": 20}
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


@pytest.fixture(scope="module")
def splits() -> Splits:
    return digits_rgb_splits()


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DIGITS_RESNET_CARD_PATH.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory, splits: Splits) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits_rgb.npz"
    return write_splits_npz(splits, path)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> FleetKey:
    return init_key(tmp_path_factory.mktemp("keys"))[0]


def _run(out: Path, npz: Path, key: FleetKey, **opts: Any) -> dict[str, Any]:
    report: dict[str, Any] = optimize(
        DIGITS_RESNET_PATH,
        npz,
        out,
        SPEC,
        key,
        OptimizeOptions(**FAST, **opts),
        progress=lambda _m: None,
    )
    return report


@pytest.fixture(scope="module")
def residual_run(
    tmp_path_factory: pytest.TempPathFactory, digits_npz: Path, key: FleetKey
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("opt") / "digits_resnet"
    # 270 validation images cannot certify 1 pt at 90% (that needs 299 even with none lost);
    # they can certify 2 pt.
    return out, _run(out, digits_npz, key, max_drop=0.02)


def test_data_and_card_match_the_shipped_model(splits: Splits, card: dict[str, Any]) -> None:
    """The frames are colour BGR, the split is the recorded one, the card names this file."""
    assert {k: len(v[1]) for k, v in splits.items()} == DIGITS_SPLIT_SIZES
    assert card["dataset"]["split_sizes"] == DIGITS_SPLIT_SIZES
    frames = splits["train"][0]
    assert frames.shape[1:] == (32, 32, 3) and frames.dtype == np.uint8
    # A real tint per image: the channels differ, and by image.
    ink = frames.reshape(len(frames), -1, 3).max(axis=1).astype(int)
    assert (ink.max(axis=1) - ink.min(axis=1) > 20).mean() > 0.5
    assert np.array_equal(frames, digits_rgb_splits()["train"][0])  # deterministic
    assert digits_preprocessing() == SPEC
    assert card["sha256"] == hashlib.sha256(DIGITS_RESNET_PATH.read_bytes()).hexdigest()
    assert card["accuracy_onnxruntime"]["test"] >= 0.95


def test_bundle_verifies_and_budget_holds(
    residual_run: tuple[Path, dict[str, Any]], key: FleetKey, card: dict[str, Any]
) -> None:
    out, report = residual_run
    verified = verify_bundle(out / "bundle", [key.public])
    assert verified.manifest.preprocessing == SPEC
    assert report["bundle"]["split_identical"] is True
    ref = report["budget"]["reference_val_accuracy"]
    # The optimizer's preprocessing is the training's, so it measures the card's accuracy.
    assert ref == pytest.approx(card["accuracy_onnxruntime"]["validation"], abs=1e-5)
    assert report["test"]["fp32_accuracy"] == pytest.approx(
        card["accuracy_onnxruntime"]["test"], abs=1e-5
    )
    default = report["exits"]["operating_points"][report["exits"]["default"]]
    assert default["val_accuracy"] >= ref - 0.02 - 1e-9
    assert report["budget"]["default_bound"]["drop_upper"] <= 0.02
    assert report["quantization"]["val_accuracy"] >= ref - 0.005 - 1e-9
    assert report["test"]["images"] == DIGITS_SPLIT_SIZES["test"]


def test_cuts_are_never_inside_a_residual_block(residual_run: tuple[Path, dict[str, Any]]) -> None:
    _, report = residual_run
    cuts = report["exits"]["cuts"]
    assert cuts, "the residual model got no early exit"
    prepared = prepare_model(
        onnx.load(DIGITS_RESNET_PATH), "digits_resnet", channels=3, height=32, width=32
    )
    valid = set(articulation_tensors(prepared.model))
    # The skips are real: the tensors inside each block are bypassed, hence not valid cuts.
    inside = [
        n.output[0]
        for n in prepared.model.graph.node
        if n.op_type == "Relu" and "/body/" in n.output[0]
    ]
    assert len(inside) == 2 and not valid & set(inside)
    for cut in cuts:
        assert cut["source"] in valid, f"cut {cut['source']!r} lies inside a residual block"


def test_agent_runtime_reproduces_reported_test_accuracy(
    residual_run: tuple[Path, dict[str, Any]], key: FleetKey, splits: Splits
) -> None:
    out, report = residual_run
    staged = StagedModel(verify_bundle(out / "bundle", [key.public]))
    pre = Preprocessor(staged.manifest.preprocessing)
    frames, labels = splits["test"]
    correct = sum(
        staged.predict(pre(f)).class_index == y for f, y in zip(frames, labels, strict=True)
    )
    assert correct / len(labels) == pytest.approx(report["test"]["accuracy"])


def test_prune_pass_is_recorded(
    tmp_path: Path,
    digits_npz: Path,
    key: FleetKey,
    residual_run: tuple[Path, dict[str, Any]],
) -> None:
    """Pruning without fine-tuning may be rejected; either way the record must be there."""
    unpruned_out, unpruned = residual_run
    out = tmp_path / "pruned"
    report = _run(out, digits_npz, key, prune=0.25, max_drop=0.02)
    verify_bundle(out / "bundle", [key.public])
    record = report["passes"][0]
    assert record["pass"].startswith("prune")
    assert isinstance(record["accepted"], bool)
    assert isinstance(record["val_accuracy"], float) and 0 <= record["val_accuracy"] <= 1
    assert record["macs_after"] < record["macs_before"]

    def bundle_macs(root: Path) -> int:
        stages = verify_bundle(root / "bundle", [key.public]).manifest.stages
        return sum(s.macs or 0 for s in stages)

    if record["accepted"]:
        assert bundle_macs(out) < bundle_macs(unpruned_out)
    else:
        # A rejected pass is reported, never shipped.
        assert report["model"]["macs"] == unpruned["model"]["macs"]
