"""Exit feature graphs: integer pooling numerics, layout independence, AveragePool agreement."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.server.optimize.exit_graph import (
    QuantParams,
    branch_model,
    pooling_cells,
    pooling_matrix,
)
from edgefleet.server.optimize.runner import make_session

OPSET = [helper.make_opsetid("", 17)]
IR = 8


def test_pooling_cells_follow_average_pool() -> None:
    assert pooling_cells(32, 32, 2) == (2, 16, 16)
    assert pooling_cells(7, 9, 2) == (2, 3, 4)  # trailing row/column left out, like AveragePool
    assert pooling_cells(1, 5, 2) == (1, 1, 5)  # smaller than the grid: global
    assert pooling_cells(8, 8, 1) == (1, 8, 8)


def test_pooling_matrix_marks_each_cell_once() -> None:
    p = pooling_matrix(7, 9, 2)
    assert p.shape == (4, 63)
    assert p.sum(axis=1).tolist() == [12, 12, 12, 12]
    cell = p[3].reshape(7, 9)  # bottom right: rows 3..5, columns 4..7
    assert cell[3:6, 4:8].all() and cell.sum() == 12
    assert p.sum(axis=0).max() == 1


def _pooled_features_reference(
    q: npt.NDArray[np.uint8], params: QuantParams, grid: int
) -> npt.NDArray[np.float32]:
    """numpy reference of the integer pooling for one NCHW uint8 map batch: (N, C*cells)."""
    n, c, h, w = q.shape
    pm = pooling_matrix(h, w, grid).astype(np.int64)
    g, kh, kw = pooling_cells(h, w, grid)
    centred = q.reshape(n, c, h * w).astype(np.int64) - params.zero_point
    sums = centred @ pm.T  # (n, c, cells), exact
    factor = np.float32(params.scale / (kh * kw))
    out: npt.NDArray[np.float32] = (sums.astype(np.float32) * factor).reshape(n, c * g * g)
    return out


def _float_pool(q: np.ndarray, params: QuantParams, grid: int) -> np.ndarray:
    """Dequantize then AveragePool + Flatten in onnxruntime: what the features mean."""
    n, c, h, w = q.shape
    g, kh, kw = pooling_cells(h, w, grid)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[kh, kw], strides=[kh, kw]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ref",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, list(q.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c * g * g])],
        [
            numpy_helper.from_array(np.array(params.scale, np.float32), "s"),
            numpy_helper.from_array(np.array(params.zero_point, np.uint8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = IR
    out: np.ndarray = make_session(model).run(None, {"q": q})[0]
    return out


CASES = [((1, 64, 16, 16), 2), ((1, 5, 7, 9), 2), ((1, 3, 6, 6), 1)]


@pytest.mark.parametrize(("shape", "grid"), CASES)
def test_nchw_and_nhwc_branches_agree_bit_for_bit(shape: tuple[int, ...], grid: int) -> None:
    rng = np.random.default_rng(0)  # shapes and exact arithmetic only: random is fine here
    q = rng.integers(0, 256, size=shape, dtype=np.uint8)
    params = QuantParams(scale=0.0173, zero_point=37)
    dims = list(shape)
    nchw = branch_model("t", dims, params, grid, "nchw", "f", OPSET, IR)
    nhwc_dims = [dims[0], dims[2], dims[3], dims[1]]
    nhwc = branch_model("t", nhwc_dims, params, grid, "nhwc", "f", OPSET, IR)
    a = make_session(nchw).run(None, {"t": q})[0]
    b = make_session(nhwc).run(None, {"t": np.ascontiguousarray(q.transpose(0, 2, 3, 1))})[0]
    ref = _pooled_features_reference(q, params, grid)
    assert a.dtype == np.float32 and a.shape == ref.shape
    assert np.array_equal(a, b)
    assert np.array_equal(a, ref)
    # Same meaning as dequantize + AveragePool, up to float rounding of the sum.
    np.testing.assert_allclose(a, _float_pool(q, params, grid), rtol=1e-5, atol=1e-5)


def test_branch_model_is_a_valid_onnx_model() -> None:
    model = branch_model("t", [1, 8, 4, 4], QuantParams(0.1, 0), 2, "nhwc", "f", OPSET, IR)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["f"]
