"""Channel pruning on small random models, run with real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgefleet.server.optimize.prune import prune_channels
from edgefleet.server.optimize.runner import make_session
from tests.optimize_models import (
    Builder,
    concat_model,
    conv_bn_model,
    depthwise_model,
    input_residual_model,
    random_input,
    residual_model,
    shared_scale_model,
)


def _run(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    (out,) = make_session(model).run(None, {"x": random_input(model, seed)})
    return np.asarray(out)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("build", [conv_bn_model, residual_model, depthwise_model])
def test_ratio_zero_changes_nothing(build: Builder) -> None:
    model = build()
    result = prune_channels(model, 0.0)
    assert result.removed == {}
    assert result.macs_after == result.macs_before
    np.testing.assert_array_equal(_run(result.model), _run(model))


def test_zero_filters_removed_exactly_through_bn_and_mul() -> None:
    zero1, zero2 = [1, 3, 4, 6], [0, 2, 5, 7, 9, 11, 13, 15]
    model = conv_bn_model(zero1, zero2)
    before = model.SerializeToString()
    result = prune_channels(model, 0.5)
    assert model.SerializeToString() == before  # the caller's proto is untouched
    assert result.removed == {"conv1": 4, "conv2": 8}
    old, new = _weights(model), _weights(result.model)
    keep1 = [c for c in range(8) if c not in zero1]
    keep2 = [c for c in range(16) if c not in zero2]
    np.testing.assert_array_equal(new["conv1_w"], old["conv1_w"][keep1])
    for name in ("s", "beta", "m", "v", "conv1_b"):
        np.testing.assert_array_equal(new[name], old[name][keep1])
    np.testing.assert_array_equal(new["chscale"], old["chscale"][keep1])
    np.testing.assert_array_equal(new["conv2_w"], old["conv2_w"][keep2][:, keep1])
    np.testing.assert_array_equal(new["fc_w"], old["fc_w"][:, keep2])  # transB: (out, in)
    for seed in range(3):
        np.testing.assert_allclose(_run(result.model, seed), _run(model, seed), atol=1e-5)


def test_zero_channels_removed_exactly_across_residual_add() -> None:
    zero_res, zero_mid = [0, 3, 5, 6], [1, 2, 4, 7]
    model = residual_model(zero_res, zero_mid)
    result = prune_channels(model, 0.5)
    assert result.removed == {"conv0": 4, "conv1": 4, "conv2": 4}
    old, new = _weights(model), _weights(result.model)
    keep = [c for c in range(8) if c not in zero_res]
    mid = [c for c in range(8) if c not in zero_mid]
    # One mask for both producers of the Add, and for the skip's consumer conv1.
    np.testing.assert_array_equal(new["conv0_w"], old["conv0_w"][keep])
    np.testing.assert_array_equal(new["conv1_w"], old["conv1_w"][mid][:, keep])
    np.testing.assert_array_equal(new["conv2_w"], old["conv2_w"][keep][:, mid])
    np.testing.assert_array_equal(new["fc_w"], old["fc_w"][keep])  # no transB: (in, out)
    for seed in range(3):
        np.testing.assert_allclose(_run(result.model, seed), _run(model, seed), atol=1e-5)


def test_depthwise_pruned_with_its_input_and_skip_respected() -> None:
    zero = [1, 2, 5, 6]
    model = depthwise_model(zero)
    result = prune_channels(model, 0.5, skip=["pw"])
    assert result.removed == {"conv0": 4, "dw": 4}
    assert result.skipped == {"pw": "conv pw is in skip"}
    dw = next(n for n in result.model.graph.node if n.name == "dw")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 4
    np.testing.assert_allclose(_run(result.model), _run(model), atol=1e-5)


@pytest.mark.parametrize("build", [conv_bn_model, residual_model, depthwise_model])
def test_half_ratio_gives_a_consistent_smaller_model(build: Builder) -> None:
    model = build()
    result = prune_channels(model, 0.5)
    onnx.checker.check_model(result.model, full_check=True)
    assert _run(result.model).shape == _run(model).shape
    # Inner convs lose half their inputs and half their outputs: about a quarter of the MACs.
    assert 0.2 < result.macs_after / result.macs_before < 0.5
    assert set(result.removed.values()) <= {4, 8}


def test_conv_bn_macs_by_hand() -> None:
    result = prune_channels(conv_bn_model(), 0.5)
    conv1 = 4 * 16 * 16 * 3 * 9  # 4 of 8 outputs over 3 inputs, 3x3, 16x16
    conv2 = 8 * 16 * 16 * 4 * 9  # 8 of 16 outputs over 4 of 8 inputs
    assert result.macs_after == conv1 + conv2 + 10 * 8


def test_reshape_target_follows_the_pruned_channels() -> None:
    result = prune_channels(depthwise_model(), 0.5)
    assert result.removed == {"conv0": 4, "dw": 4, "pw": 8}
    assert list(_weights(result.model)["shape"]) == [1, 8]
    assert _run(result.model).shape == (1, 10)


def test_shared_constant_is_copied_per_mask() -> None:
    model = shared_scale_model()
    result = prune_channels(model, 0.5)
    assert result.removed == {"left": 4, "right": 4}
    old, new = _weights(model), _weights(result.model)
    scales = {n.input[1] for n in result.model.graph.node if n.op_type == "Mul"}
    assert len(scales) == 2  # one copy per branch, each sliced by its own mask
    kept = sorted(tuple(new[s].ravel()) for s in scales)
    assert kept == sorted([tuple(old["scale"].ravel()[4:]), tuple(old["scale"].ravel()[:4])])
    np.testing.assert_allclose(_run(result.model), _run(model), atol=1e-5)


def test_min_channels_is_kept() -> None:
    result = prune_channels(conv_bn_model(), 0.9, min_channels=6)
    assert result.removed == {"conv1": 2, "conv2": 10}  # floor(0.9 * 16) = 14 > 16 - 6


def test_unprunable_groups_are_recorded() -> None:
    result = prune_channels(input_residual_model(), 0.5)
    assert result.removed == {}
    assert "x is a graph input" in result.skipped["conv_a"]
    assert "graph output" in result.skipped["conv_out"]
    result = prune_channels(concat_model(), 0.5)
    assert result.removed == {"mix": 4}
    assert result.skipped == {
        "left": "consumed by Concat node cat",
        "right": "consumed by Concat node cat",
    }
    assert _run(result.model).shape == (1, 4)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range(ratio: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        prune_channels(conv_bn_model(), ratio)
