"""The round's parts alone: spec checks, evaluation numerics, the base bundle and candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edgefleet.agent.bundle import BundleError, generate_private_key, verify_bundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.protocol import FedUpdate
from edgefleet.server.federated.base import open_base
from edgefleet.server.federated.candidate import (
    candidate_body,
    candidate_files,
    sign_candidate,
    write_unsigned,
)
from edgefleet.server.federated.evaluate import (
    DeviceFigures,
    HoldoutFigures,
    device_figures,
    load_holdout,
    operating_figures,
    verdict,
)
from edgefleet.server.federated.spec import RoundSpec, parse_quorum
from edgefleet.server.rollout.archives import ArchiveStore
from tests import protocol_samples as samples
from tests.bundle_helpers import two_stage_body, two_stage_files
from tests.federated.rounds_rig import digits


def test_quorum_is_a_count_or_a_share_of_the_expected_devices() -> None:
    assert parse_quorum("2").needed(10) == 2
    assert parse_quorum("50%").needed(3) == 2  # rounds up
    assert parse_quorum("10%").needed(3) == 1  # never below one update
    assert parse_quorum("100%").needed(7) == 7
    for bad in ("0", "0%", "150%", "two", "-1"):
        with pytest.raises(ValueError, match="quorum"):
            parse_quorum(bad)


def test_a_spec_refuses_what_its_aggregator_cannot_take() -> None:
    spec = RoundSpec(group="lab", aggregator="trimmed_mean")
    assert spec.aggregator_kwargs() == {"trim": 0.2}
    krum = RoundSpec(group="lab", aggregator="krum", aggregator_params={"f": 2, "m": 3})
    assert krum.aggregator_kwargs() == {"f": 2, "m": 3}
    assert all(isinstance(v, int) for v in krum.aggregator_kwargs().values())
    with pytest.raises(ValidationError, match="unknown \\['trim'\\]"):
        RoundSpec(group="lab", aggregator="median", aggregator_params={"trim": 0.1})
    with pytest.raises(ValidationError, match="whole number"):
        RoundSpec(group="lab", aggregator="krum", aggregator_params={"f": 1.5})
    with pytest.raises(ValidationError, match="distinct"):
        RoundSpec(group="lab", heads=[0, 0])
    with pytest.raises(ValidationError, match="quorum"):
        RoundSpec(group="lab", quorum="most")
    with pytest.raises(ValidationError, match="filled in by the coordinator"):
        RoundSpec.model_validate({"group": "lab", "rollout": {"deltas": {"a" * 64: "b" * 64}}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RoundSpec.model_validate({"group": "lab", "epochs": 3})


def test_operating_figures_by_hand() -> None:
    # Four frames, one early exit. Confidences (max softmax) 0.73, 0.5, 0.73, 0.5.
    early = [np.array([[1, 0], [0, 0], [0, 1], [0, 0]], np.float32)]
    final = np.array([[0, 5], [5, 0], [0, 5], [0, 5]], np.float32)
    labels = np.array([0, 0, 1, 1], np.int64)
    # The final head alone says 1, 0, 1, 1: frame 0 wrong.
    # At 0.7 frames 0 and 2 exit early (classes 0 and 1: right), 1 and 3 go on (0, 1: right).
    assert operating_figures(early, final, labels, [0.7], ["max_softmax"]) == (1.0, 0.5)
    # Exit off: the final head alone, 3 of 4 right.
    assert operating_figures(early, final, labels, [None], ["max_softmax"]) == (0.75, 0.0)
    # At 0.4 every frame exits; frames 1 and 3 tie and take class 0: frame 3 wrong.
    assert operating_figures(early, final, labels, [0.4], ["max_softmax"]) == (0.75, 1.0)
    # No early exit at all: the final head.
    assert operating_figures([], final, labels, [], []) == (0.75, 0.0)


def _update(device: str, val: int, before: float, after: float) -> FedUpdate:
    return samples.fed_update().model_copy(
        update={
            "device_id": device,
            "val_samples": val,
            "val_accuracy_before": before,
            "val_accuracy_after": after,
        }
    )


def test_device_figures_weigh_by_validation_samples_and_the_verdict_keeps_its_tolerance() -> None:
    ups = [_update("a", 300, 0.8, 0.9), _update("b", 100, 0.6, 0.5)]
    got = device_figures(ups)
    assert got is not None and got.devices == 2 and got.val_samples == 400
    assert got.accuracy_before == pytest.approx(0.75) and got.accuracy_after == pytest.approx(0.8)
    silent = samples.fed_update().model_copy(update={"val_accuracy_before": None})
    assert device_figures([silent]) is None
    assert verdict(None, None, 0.005) == (
        False,
        "no held-out set and no device reported its validation accuracy",
    )
    ok, why = verdict(None, got, 0.005)
    assert ok and why == "devices' val accuracy 75.00% -> 80.00% (tolerance 0.5 pt)"
    held = HoldoutFigures(100, 0, [0.8], 0.90, 0.896, 0.5, 0.6)
    assert verdict(held, got, 0.005)[0]  # the holdout decides: -0.4 pt is within 0.5 pt
    worse = HoldoutFigures(100, 0, [0.8], 0.90, 0.89, 0.5, 0.6)
    assert verdict(worse, DeviceFigures(1, 1, 0.1, 0.9, None, None), 0.005) == (
        False,
        "held-out accuracy 90.00% -> 89.00% (tolerance 0.5 pt)",
    )


def test_a_holdout_file_is_read_like_the_optimizers_data(tmp_path: Path) -> None:
    d = digits()
    path = tmp_path / "holdout.npz"
    np.savez(path, test_images=d.test_images, test_labels=d.test_labels)
    h = load_holdout(path)
    assert len(h.images) == 540 and h.labels == [str(v) for v in d.test_labels.tolist()]
    np.testing.assert_array_equal(h.label_indices([str(i) for i in range(10)]), d.test_labels)
    np.savez(tmp_path / "bad.npz", images=d.test_images.astype(np.float32), labels=d.test_labels)
    with pytest.raises(ValueError, match="must be uint8"):
        load_holdout(tmp_path / "bad.npz")
    np.savez(tmp_path / "none.npz", x=d.test_images)
    with pytest.raises(ValueError, match="expected arrays 'images' and 'labels'"):
        load_holdout(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="not among the bundle's"):
        h.label_indices(["cat", "dog"])


def test_the_base_names_its_trainable_heads_and_a_candidate_changes_only_them(
    tmp_path: Path,
) -> None:
    from edgefleet.agent.bundle import write_bundle

    key = generate_private_key()
    src = tmp_path / "tiny"
    write_bundle(src, two_stage_body(), two_stage_files(), key)
    archives = ArchiveStore(tmp_path / "archives", [key.public_key()])
    base = open_base(archives.add(src), tmp_path / "bases", [key.public_key()])
    assert base.trainable == [0]
    assert base.shapes([0]) == {"exit0.weight": (3, 4), "exit0.bias": (3,)}
    with pytest.raises(ValueError, match="early exit 1 of tiny-cnn v3 has no trainable head"):
        base.head_file(1)
    again = open_base(archives.add(src), tmp_path / "bases", [key.public_key()])
    assert again.verified.path == base.verified.path  # unpacked once

    head = base.head(0)
    new = HeadWeights(head.weight + 1.0, head.bias - 1.0)
    body = candidate_body(base, created_ts=5.0, provenance={"fed_round": "f-1"})
    assert (body.version, body.created_ts, body.provenance.optimizer) == (
        4,
        5.0,
        {"int8": True, "fed_round": "f-1"},
    )
    unsigned = write_unsigned(tmp_path / "cand", body, candidate_files(base, {0: new}))
    with pytest.raises(BundleError):
        verify_bundle(unsigned, [key.public_key()])  # not signed: no device would take it
    signed = sign_candidate(unsigned, tmp_path / "signed", key)
    verified = verify_bundle(tmp_path / "signed", [key.public_key()])
    assert signed.version == 4 and verified.manifest.stages == base.manifest.stages
    got = HeadWeights.from_npz_bytes(verified.read("heads/exit0.npz"))
    np.testing.assert_array_equal(got.weight, new.weight)
    same = {
        n for n in base.manifest.files if base.manifest.files[n] == verified.manifest.files[n]
    }
    assert same == {"stage0.onnx", "stage1.onnx"}
    with pytest.raises(BundleError, match="not an unsigned round candidate"):
        sign_candidate(tmp_path / "signed", tmp_path / "again", key)
