"""Per-node timing of fp32 and INT8 models, and the speed fallback (server/optimize/node_timing).

Real onnxruntime profiles of small real models are checked for structure only (which nodes,
which glue goes where, time conserved); decisions are driven by fake timing tables, so no test
depends on this machine's speed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgefleet.server.optimize.node_timing import (
    UNATTRIBUTED,
    NodeTiming,
    attribute,
    decide,
    parse_profile,
    profile_model,
    slower_in_int8,
    speed_fallback,
)
from edgefleet.server.optimize.quantize import fuse_hardswish, quantize_qdq
from edgefleet.server.optimize.runner import logits_of
from tests.optimize_models import conv_bn_model, depthwise_model, residual_model

F32 = np.ndarray


def _samples(model: onnx.ModelProto, n: int, seed: int = 0) -> F32:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *dims[1:])).astype(np.float32)


def _event(node: str, op: str, dur: float, dtype: str = "float") -> dict[str, object]:
    return {
        "cat": "Node",
        "name": f"{node}_kernel_time",
        "dur": dur,
        "args": {"op_name": op, "input_type_shape": [{dtype: [1, 8]}]},
    }


def test_parse_profile_takes_per_node_medians_after_warmup() -> None:
    events = [
        {"cat": "Session", "name": "model_run", "dur": 999},
        _event("conv", "QLinearConv", 1000, "uint8"),  # warm-up run: dropped
        _event("conv", "QLinearConv", 10, "uint8"),
        _event("conv", "QLinearConv", 30, "uint8"),
        _event("conv", "QLinearConv", 11, "uint8"),
        {"cat": "Node", "name": "conv_fence_before", "dur": 500},
        _event("pool", "GlobalAveragePool", 4),
        _event("pool", "GlobalAveragePool", 6),
        _event("pool", "GlobalAveragePool", 5),
        _event("pool", "GlobalAveragePool", 7),
    ]
    p = parse_profile(events, warmup=1)
    assert p.node_us == {"conv": 11.0, "pool": 6.0}
    assert p.op_type == {"conv": "QLinearConv", "pool": "GlobalAveragePool"}
    assert p.int8_kernels == {"conv"}
    assert p.runs == 3


def test_real_profile_has_every_executed_node_once_per_run() -> None:
    model = conv_bn_model()
    x = _samples(model, 6)
    p, optimized = profile_model(model, x, threads=1, warmup=2)
    assert p.runs == 4
    assert set(p.node_us) == {n.name for n in optimized.graph.node}
    assert all(us >= 0 for us in p.node_us.values())
    assert not p.int8_kernels  # fp32 model: no 8-bit inputs anywhere


def test_attribution_charges_qdq_glue_to_the_nodes_that_need_it() -> None:
    """conv1 -> bn -> relu -> mul -> conv2 with mul kept fp32: a float island in INT8.

    The DequantizeLinear after conv1 is conv1's (its int8 output must be made float), the
    QuantizeLinear after mul is conv2's (its int8 input must be made); every microsecond of the
    profile lands on a node of the fp32 graph.
    """
    model = conv_bn_model()
    x = _samples(model, 8)
    q = quantize_qdq(model, "x", x, exclude=["mul"])
    p, optimized = profile_model(q, x, threads=1)
    ops = {n.name: n.op_type for n in optimized.graph.node}
    assert "QLinearConv" in ops.values() and "Mul" in ops.values()
    a = attribute(p, optimized, model)
    names = {n.name for n in model.graph.node}
    assert UNATTRIBUTED not in a.total_us
    assert set(a.total_us) <= names
    assert sum(a.total_us.values()) == pytest.approx(sum(p.node_us.values()))
    assert {"conv1", "conv2", "logits"} <= a.int8
    assert "mul" not in a.int8  # the excluded node runs its float kernel
    # Glue each side of the float island, on the int8 nodes around it.
    assert a.glue_us.get("conv1", 0) > 0
    assert a.glue_us.get("conv2", 0) > 0
    for node, glue in a.glue_us.items():
        assert glue <= a.total_us[node]


def test_fp32_attribution_follows_fused_and_renamed_kernels() -> None:
    """onnxruntime fuses conv+relu and renames NCHWc convs after their output tensor."""
    model = residual_model()
    p, optimized = profile_model(model, _samples(model, 4), threads=1)
    a = attribute(p, optimized, model)
    assert UNATTRIBUTED not in a.total_us
    assert {"conv0", "conv1", "conv2"} <= set(a.total_us)
    assert not {"relu0", "relu1"} & set(a.total_us)  # fused into their convs
    assert sum(a.total_us.values()) == pytest.approx(sum(p.node_us.values()))


def test_decide_marks_only_int8_candidates_beyond_the_margin() -> None:
    fp32 = {"a": 100.0, "b": 100.0, "c": 10.0, "d": 1.0, "f": 5.0}
    int8 = {"a": 50.0, "b": 150.0, "c": 30.0, "d": 4.0, "f": 50.0}
    slower, rows = decide(fp32, int8, {"a", "b", "c", "d"})
    assert slower == ["b", "c"]  # biggest loss first; d's loss is under the 5 us floor
    assert rows["a"]["decision"] == "int8"
    assert rows["b"] == {"fp32_us": 100.0, "int8_us": 150.0, "decision": "fp32"}
    assert rows["f"]["decision"] == "float op"  # not quantized: nothing to fall back


def test_slower_in_int8_report_structure_on_a_real_model() -> None:
    model = depthwise_model()
    x = _samples(model, 6)
    q = quantize_qdq(model, "x", x)
    t = slower_in_int8(model, q, x, threads=1)
    assert isinstance(t, NodeTiming)
    names = {n.name for n in model.graph.node}
    assert set(t.slower) <= names
    assert set(t.report["nodes"]) <= names
    row = t.report["nodes"]["dw"]
    assert set(row) == {"fp32_us", "int8_us", "decision", "int8_glue_us"}
    assert row["decision"] in ("int8", "fp32")
    assert t.report["int8_total_us"] > 0 and t.report["fp32_total_us"] > 0


def _fake_timer(slow: list[str]) -> tuple[list[onnx.ModelProto], object]:
    seen: list[onnx.ModelProto] = []

    def timer(fp32: onnx.ModelProto, qdq: onnx.ModelProto, x: F32, threads: int) -> NodeTiming:
        seen.append(qdq)
        return NodeTiming({}, {}, list(slow), {"fake": True})

    return seen, timer


def _int8_convs(q: onnx.ModelProto) -> set[str]:
    """Convs whose weight comes through a DequantizeLinear."""
    dq = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in q.graph.node if n.op_type == "Conv" and n.input[1] in dq}


def test_speed_fallback_keeps_the_slower_node_fp32_when_the_model_gains() -> None:
    model = residual_model()
    calib, val = _samples(model, 32, seed=1), _samples(model, 32, seed=2)
    _, timer = _fake_timer(["conv1"])
    q, report = speed_fallback(
        model,
        "x",
        calib,
        ["logits"],
        timer=timer,  # type: ignore[arg-type]
        ratio=lambda a, b, x, t, r: 0.9,
        max_passes=1,
    )
    onnx.checker.check_model(q, full_check=True)
    assert _int8_convs(q) == {"conv0", "conv2"}
    assert report["speed_excluded"] == ["conv1"]
    assert report["excluded"] == ["logits", "conv1"]
    base = quantize_qdq(model, "x", calib, exclude=["logits"])
    ref, got, was = logits_of(model, val), logits_of(q, val), logits_of(base, val)
    assert np.abs(got - ref).mean() <= np.abs(was - ref).mean()  # one more fp32 layer
    top1 = np.mean(got.argmax(-1) == ref.argmax(-1))
    assert top1 >= np.mean(was.argmax(-1) == ref.argmax(-1))


def test_speed_fallback_keeps_int8_when_the_whole_model_is_not_faster() -> None:
    model = residual_model()
    calib = _samples(model, 16, seed=1)
    ratios: list[int] = []

    def no_gain(a: onnx.ModelProto, b: onnx.ModelProto, x: F32, t: int, r: int) -> float:
        ratios.append(len(_int8_convs(b)))
        return 1.0

    _, timer = _fake_timer(["conv1", "conv2"])
    q, report = speed_fallback(model, "x", calib, timer=timer, ratio=no_gain)  # type: ignore[arg-type]
    assert _int8_convs(q) == {"conv0", "conv1", "conv2"}
    assert report["speed_excluded"] == []
    # Both slower nodes, then the bigger half of them, each timed against the INT8 model (both
    # are weight layers, so the weight-layer subset is the first try again and is skipped).
    assert ratios == [1, 2]
    assert [t["nodes"] for t in report["passes"][0]["tried"]] == [["conv1", "conv2"], ["conv1"]]


def test_speed_fallback_tries_the_weight_layers_alone() -> None:
    model = conv_bn_model()
    calib = _samples(model, 16, seed=1)
    _, timer = _fake_timer(["mul", "bn", "conv2"])
    faster_without_int8_conv2 = {"conv1"}  # conv2 back in fp32, mul and bn still INT8

    def gain(a: onnx.ModelProto, b: onnx.ModelProto, x: F32, t: int, r: int) -> float:
        return (
            0.9
            if _int8_convs(b) == faster_without_int8_conv2 and "mul" not in _float_ops(b)
            else 1.0
        )

    q, report = speed_fallback(model, "x", calib, timer=timer, ratio=gain, max_passes=1)  # type: ignore[arg-type]
    assert report["speed_excluded"] == ["conv2"]
    assert [t["nodes"] for t in report["passes"][0]["tried"]] == [["mul", "bn", "conv2"], ["conv2"]]
    assert _int8_convs(q) == {"conv1"}


def _float_ops(q: onnx.ModelProto) -> set[str]:
    """Nodes none of whose inputs come through a DequantizeLinear."""
    dq = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name
        for n in q.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and not set(n.input) & dq
    }


def test_fuse_hardswish_rewrites_the_paddle_spelling_exactly() -> None:
    """x * clip(x + 3, 0, 6) / 6 after a conv becomes one HardSwish with the same output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "three"], ["a"], name="add"),
        helper.make_node("Clip", ["a", "zero", "six"], ["r"], name="clip"),
        helper.make_node("Mul", ["c", "r"], ["m"], name="mul"),
        helper.make_node("Div", ["m", "six"], ["y"], name="div"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    assert fuse_hardswish(fused) == 1
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in fused.graph.node] == ["Conv", "HardSwish"]
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32) * 3
    np.testing.assert_allclose(logits_of(fused, x), logits_of(model, x), atol=1e-5)
    # Opset 13 has no HardSwish: nothing changes.
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 13
    assert fuse_hardswish(old) == 0


def test_profile_model_refuses_no_samples() -> None:
    model = conv_bn_model()
    with pytest.raises(ValueError, match="no samples"):
        profile_model(model, np.zeros((0, 3, 16, 16), np.float32), threads=1)
