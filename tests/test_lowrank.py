"""Truncated-SVD factorisation of Gemm, MatMul and 1x1 Conv, run with real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgefleet.server.optimize.lowrank import choose_rank, low_rank
from edgefleet.server.optimize.runner import make_session
from tests.optimize_models import mlp_model, pointwise_model, random_input


def _run(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    (out,) = make_session(model).run(None, {"x": random_input(model, seed)})
    return np.asarray(out)


def test_choose_rank_keeps_the_energy() -> None:
    assert choose_rank([3.0, 4.0, 0.0], 0.95) == 2
    assert choose_rank([4.0, 1.0, 1.0], 0.5) == 1  # 16 of 18 already
    assert choose_rank([1.0, 1.0, 1.0, 1.0], 1.0) == 4


@pytest.mark.parametrize("trans_b", [True, False])
def test_rank_four_gemm_and_matmul_are_factored_exactly(trans_b: bool) -> None:
    model = mlp_model(rank=4, trans_b=trans_b)
    before = model.SerializeToString()
    result = low_rank(model)
    assert model.SerializeToString() == before
    assert result.factored == {"fc1": (4, 64), "fc2": (4, 32)}
    onnx.checker.check_model(result.model, full_check=True)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Gemm", "Gemm", "Relu", "MatMul", "MatMul", "Add"]
    # alpha 0.5 and beta 2 survive the split, and the old weights are gone.
    names = {t.name for t in result.model.graph.initializer}
    assert "w1" not in names and "w2" not in names
    for seed in range(3):
        np.testing.assert_allclose(_run(result.model, seed), _run(model, seed), atol=1e-5)
    # 64x64 -> 64x4 + 4x64, and 64x32 -> 64x4 + 4x32.
    assert result.macs_before == 64 * 64 + 64 * 32
    assert result.macs_after == 2 * 64 * 4 + 64 * 4 + 4 * 32


def test_full_rank_weight_is_left_alone() -> None:
    model = mlp_model(rank=None)
    result = low_rank(model)
    assert "fc1" not in result.factored
    assert any(n.name == "fc1" and n.op_type == "Gemm" for n in result.model.graph.node)
    np.testing.assert_allclose(_run(result.model), _run(model), atol=1e-5)


def test_nothing_to_factor_returns_an_equal_model() -> None:
    model = mlp_model(rank=None)
    result = low_rank(model, min_saving=0.99)
    assert result.factored == {}
    assert result.model.SerializeToString() == model.SerializeToString()
    assert result.macs_after == result.macs_before


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_is_factored(stride: int) -> None:
    model = pointwise_model(stride)
    result = low_rank(model)
    assert result.factored == {"pw": (4, 16)}
    first, second = result.model.graph.node[:2]
    assert [first.op_type, second.op_type] == ["Conv", "Conv"]
    assert len(second.input) == 3  # the bias moves to the second conv
    np.testing.assert_allclose(_run(result.model), _run(model), atol=1e-5)
    assert result.macs_after < result.macs_before


def test_energy_trades_accuracy_for_rank() -> None:
    result = low_rank(mlp_model(rank=None), energy=0.5, min_saving=0.0)
    rank, full = result.factored["fc1"]
    assert 1 <= rank < full == 64


@pytest.mark.parametrize(("energy", "min_saving"), [(0.0, 0.25), (1.1, 0.25), (0.9, 1.0)])
def test_bad_options(energy: float, min_saving: float) -> None:
    with pytest.raises(ValueError, match="energy" if energy != 0.9 else "min_saving"):
        low_rank(mlp_model(), energy=energy, min_saving=min_saving)
