"""MAC counts of small hand-built ONNX graphs, checked against the arithmetic by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.server.optimize.macs import cumulative_macs_at, node_keys, node_macs, total_macs


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int | str]],
    outputs: list[str],
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # Strict inference rejects a malformed test graph (bad shapes, wrong attributes).
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model


def test_conv_3x3_single_to_eight_channels() -> None:
    same = helper.make_node("Conv", ["x", "w"], ["y"], name="same", pads=[1, 1, 1, 1])
    valid = helper.make_node("Conv", ["x", "w"], ["z"], name="valid")
    model = _model([same, valid], {"x": [1, 1, 16, 16]}, ["y", "z"], [_init("w", 8, 1, 3, 3)])
    # 8 out channels x 16x16 outputs x 9 products; without padding 14x14 outputs.
    assert node_macs(model) == {"same": 8 * 16 * 16 * 9, "valid": 8 * 14 * 14 * 9}
    assert total_macs(model) == 18432 + 14112


def test_dynamic_batch_counts_as_one() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])
    model = _model([conv], {"x": ["N", 1, 16, 16]}, ["y"], [_init("w", 8, 1, 3, 3)])
    assert node_macs(model) == {"c": 18432}


def test_grouped_strided_and_1d_conv() -> None:
    # 4 -> 8 channels in 2 groups: each output sees 2 input channels x 3x3.
    grouped = helper.make_node("Conv", ["x", "wg"], ["g"], name="g", group=2, pads=[1, 1, 1, 1])
    # Depthwise, stride 2: 8x8 -> 4x4, each output sees 1 channel x 3x3.
    depthwise = helper.make_node(
        "Conv", ["g", "wd"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1], strides=[2, 2]
    )
    conv1d = helper.make_node("Conv", ["s", "w1"], ["o"], name="c1d")
    model = _model(
        [grouped, depthwise, conv1d],
        {"x": [1, 4, 8, 8], "s": [1, 2, 10]},
        ["d", "o"],
        [_init("wg", 8, 2, 3, 3), _init("wd", 8, 1, 3, 3), _init("w1", 4, 2, 3)],
    )
    assert node_macs(model) == {
        "g": 8 * 8 * 8 * 2 * 9,
        "dw": 8 * 4 * 4 * 9,
        "c1d": 4 * 8 * 2 * 3,
    }


def test_conv_transpose_scatter_count() -> None:
    # Weight (C_in=4, C_out=2, 2, 2), stride 2: each of 4x5x5 inputs scatters into 2x2x2.
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])
    model = _model([node], {"x": [1, 4, 5, 5]}, ["y"], [_init("w", 4, 2, 2, 2)])
    assert node_macs(model) == {"up": 4 * 25 * 2 * 4}


def test_gemm_with_and_without_transposes() -> None:
    fc = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    fc_t = helper.make_node("Gemm", ["xt", "w2"], ["y2"], name="fct", transA=1)
    model = _model(
        [fc, fc_t],
        {"x": [1, 64], "xt": [32, 3]},
        ["y", "y2"],
        [_init("w", 10, 64), _init("b", 10), _init("w2", 32, 5)],
    )
    # (1x64) @ (64x10); A^T is (3x32) @ (32x5).
    assert node_macs(model) == {"fc": 640, "fct": 3 * 5 * 32}


def test_matmul_batched_broadcast_and_vector() -> None:
    batched = helper.make_node("MatMul", ["a", "b"], ["ab"], name="batched")
    broadcast = helper.make_node("MatMul", ["c", "d"], ["cd"], name="broadcast")
    vector = helper.make_node("MatMul", ["v", "b"], ["vb"], name="vector")
    model = _model(
        [batched, broadcast, vector],
        {"a": [2, 3, 4, 5], "c": [3, 4, 5], "v": [5]},
        ["ab", "cd", "vb"],
        [_init("b", 5, 6), _init("d", 2, 1, 5, 6)],
    )
    assert node_macs(model) == {
        "batched": 2 * 3 * 4 * 6 * 5,
        "broadcast": 2 * 3 * 4 * 6 * 5,  # (3,4,5) @ (2,1,5,6) -> (2,3,4,6)
        "vector": 6 * 5,
    }


def _two_branch() -> onnx.ModelProto:
    # x -> left conv -> relu -> a;  x -> right conv -> b;  a + b -> pool -> flatten -> fc -> y
    nodes = [
        helper.make_node("Conv", ["x", "wl"], ["l"], name="left", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["l"], ["a"]),  # unnamed: keyed Relu_1
        helper.make_node("Conv", ["x", "wr"], ["b"], name="right"),  # 1x1
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1),
    ]
    inits = [_init("wl", 4, 2, 3, 3), _init("wr", 4, 2, 1, 1), _init("wf", 10, 4)]
    return _model(nodes, {"x": [1, 2, 8, 8]}, ["y"], inits)


def test_two_branch_counts_and_unnamed_keys() -> None:
    model = _two_branch()
    before = model.SerializeToString()
    left, right, fc = 4 * 64 * 2 * 9, 4 * 64 * 2, 10 * 4
    assert node_macs(model) == {
        "left": left,
        "Relu_1": 0,
        "right": right,
        "add": 0,
        "gap": 0,
        "flat": 0,
        "fc": fc,
    }
    assert total_macs(model) == left + right + fc
    # Shape inference ran on a copy: no value_info or names were added to the caller's model.
    assert model.SerializeToString() == before


def test_cumulative_macs_follow_only_ancestors() -> None:
    model = _two_branch()
    left, right, fc = 4 * 64 * 2 * 9, 4 * 64 * 2, 10 * 4
    got = cumulative_macs_at(model, ["a", "b", "s", "y", "x", "wl"])
    assert got == {
        "a": left,  # the right branch is not needed for a
        "b": right,
        "s": left + right,
        "y": left + right + fc,
        "x": 0,
        "wl": 0,
    }
    with pytest.raises(ValueError, match="'nope' is neither produced"):
        cumulative_macs_at(model, ["nope"])


def test_duplicate_names_get_unique_keys() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r1"], name="act"),
        helper.make_node("Relu", ["r1"], ["r2"], name="act"),
    ]
    model = _model(nodes, {"x": [1, 4]}, ["r2"], [])
    assert node_keys(model.graph) == ["act", "act#1"]
    assert node_macs(model) == {"act": 0, "act#1": 0}


def test_unknown_shape_is_an_error_naming_the_node() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="blind")
    graph = helper.make_graph(
        [conv],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],  # rank unknown
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("w", 8, 1, 3, 3)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match=r"node blind \(Conv\): no shape known for tensor 'y'"):
        node_macs(model)
