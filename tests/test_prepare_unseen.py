"""What other exporters write, as the zoo's public models showed it: the optimizer copes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtime.confidence import softmax
from edgefleet.server.optimize.accuracy_control import cross_entropy
from edgefleet.server.optimize.prepare import name_nodes, prepare_model
from edgefleet.server.optimize.runner import logits_of


def _paddle_like(softmax_out: bool = True) -> onnx.ModelProto:
    """A conv classifier whose input is [-1, 3, '?', '?'] (PaddlePaddle's dynamic dims: -1,
    and one name for both H and W), two nodes sharing a name, and a Softmax at the end."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(0, 0.5, (2, 4)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="same"),
        helper.make_node("Relu", ["c"], ["r"], name="same"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["z" if softmax_out else "out"], transB=1),
    ]
    if softmax_out:
        nodes.append(helper.make_node("Softmax", ["z"], ["out"], axis=1, name="probs"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    graph = helper.make_graph(
        nodes,
        "paddle_like",
        [x],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [-1, 2])],
        [w, fc],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_dynamic_dims_written_as_minus_one_and_a_shared_name_are_fixed() -> None:
    prepared = prepare_model(
        _paddle_like(), "paddle_like.onnx", channels=3, height=48, width=192, layout="NCHW"
    )
    dims = prepared.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 48, 192]
    assert prepared.classes == 2
    x = np.random.default_rng(1).uniform(size=(3, 1, 3, 48, 192)).astype(np.float32)
    out = logits_of(prepared.model, x.reshape(3, 3, 48, 192))
    assert out.shape == (3, 2) and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_every_node_name_is_unique_after_preparing() -> None:
    model = _paddle_like()
    assert name_nodes(model) == 2  # the repeated 'same' and the unnamed Gemm
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(names)
    prepared = prepare_model(
        _paddle_like(), "paddle_like.onnx", channels=3, height=16, width=16, layout="NCHW"
    )
    names = [n.name for n in prepared.model.graph.node]
    assert len(set(names)) == len(names) and all(names)


def test_cross_entropy_reads_probabilities_as_probabilities() -> None:
    # A model ending in Softmax: a second softmax would flatten every row toward uniform and
    # make every layer's sensitivity look alike.
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (50, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    probs = softmax(logits).astype(np.float32)
    assert np.isclose(cross_entropy(probs, labels), cross_entropy(logits, labels), rtol=1e-5)
    flattened = float(np.mean(-np.log(softmax(probs)[np.arange(50), labels])))
    assert not np.isclose(cross_entropy(probs, labels), flattened, rtol=1e-3)
