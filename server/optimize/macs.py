"""Multiply-accumulate counts per node of an ONNX graph, and up to chosen tensors.

Counted: Conv / ConvInteger / QLinearConv (groups, any spatial rank), ConvTranspose (exact for
the scatter form, ignoring output cropping), Gemm, MatMul / MatMulInteger / QLinearMatMul
(batched, broadcast). Every other op, pooling and elementwise included, counts 0: they are
memory-bound and small next to the products above. Bias additions are not counted. Symbolic or
unknown dims count as 1 (batch 1), so fix spatial dims before counting. Subgraphs (If, Loop)
are not entered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx
from onnx import shape_inference

Shape = tuple[int, ...]

# Position of the data and weight inputs per op; the quantized forms carry scales and zero
# points in between.
_CONV_INPUTS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL_INPUTS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


def node_keys(graph: onnx.GraphProto) -> list[str]:
    """Key of every node in graph order: its name, or f"{op_type}_{index}" when unnamed.

    index is the node's position in graph.node. A key already taken (duplicate names) gets
    f"#{index}" appended, so keys are unique and stable for a given graph.
    """
    keys: list[str] = []
    taken: set[str] = set()
    for i, node in enumerate(graph.node):
        key = node.name or f"{node.op_type}_{i}"
        if key in taken:
            key = f"{key}#{i}"
        taken.add(key)
        keys.append(key)
    return keys


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    # infer_shapes returns a new model: the caller's proto is never touched.
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, Shape] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                for d in tensor_type.shape.dim
            )
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _shape(shapes: dict[str, Shape], node: onnx.NodeProto, key: str, name: str) -> Shape:
    if name not in shapes:
        raise ValueError(f"node {key} ({node.op_type}): no shape known for tensor {name!r}")
    return shapes[name]


def _macs(node: onnx.NodeProto, key: str, shapes: dict[str, Shape]) -> int:
    op = node.op_type
    if op in _CONV_INPUTS:
        _, w = _CONV_INPUTS[op]
        weight = _shape(shapes, node, key, node.input[w])
        out = _shape(shapes, node, key, node.output[0])
        # Each output element: (C_in / group) * prod(kernel) products; weight is
        # (C_out, C_in / group, *kernel), so that factor is prod(weight[1:]).
        return math.prod(out) * math.prod(weight[1:])
    if op == "ConvTranspose":
        x = _shape(shapes, node, key, node.input[0])
        weight = _shape(shapes, node, key, node.input[1])
        # Every input element is scattered through (C_out / group) * prod(kernel) products;
        # weight is (C_in, C_out / group, *kernel).
        return math.prod(x) * math.prod(weight[1:])
    if op in _MATMUL_INPUTS:
        a_idx, _ = _MATMUL_INPUTS[op]
        a = _shape(shapes, node, key, node.input[a_idx])
        out = _shape(shapes, node, key, node.output[0])
        # The output already holds the broadcast batch dims and drops 1-D operands' dims.
        return math.prod(out) * a[-1]
    if op == "Gemm":
        a = _shape(shapes, node, key, node.input[0])
        out = _shape(shapes, node, key, node.output[0])
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[0] if trans_a else a[1]
        return math.prod(out) * k
    return 0


def _node_macs_list(model: onnx.ModelProto) -> tuple[list[str], list[int]]:
    shapes = _shapes(model)
    keys = node_keys(model.graph)
    return keys, [_macs(n, k, shapes) for n, k in zip(model.graph.node, keys, strict=True)]


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs per node at batch 1, keyed as node_keys() names them; the model is not modified."""
    keys, macs = _node_macs_list(model)
    return dict(zip(keys, macs, strict=True))


def total_macs(model: onnx.ModelProto) -> int:
    """MACs of the whole graph at batch 1."""
    return sum(_node_macs_list(model)[1])


def cumulative_macs_at(model: onnx.ModelProto, tensor_names: Sequence[str]) -> dict[str, int]:
    """MACs of every node that must run to produce each named tensor (its ancestor closure)."""
    _, macs = _node_macs_list(model)
    graph = model.graph
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer[name] = i
    sources = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    result: dict[str, int] = {}
    for target in tensor_names:
        if target not in producer and target not in sources:
            raise ValueError(f"tensor {target!r} is neither produced by a node nor a graph input")
        needed: set[int] = set()
        stack = [target]
        while stack:
            name = stack.pop()
            node_index = producer.get(name)
            if node_index is None or node_index in needed:
                continue
            needed.add(node_index)
            stack.extend(n for n in graph.node[node_index].input if n)
        result[target] = sum(macs[i] for i in needed)
    return result
