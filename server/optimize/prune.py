"""Structured L1 channel pruning of convolutions, kept consistent across residual joins.

Tensors that must share one channel index set (an Add's operands and result, the input and
output of a channel-preserving op) form a channel group, built with a union-find. A group is
pruned with one mask, chosen from the summed filter L1 norms of the group-1 convs producing it,
and the mask is applied to every producer, pass-through parameter and consumer. A group that
touches anything not understood (a graph input or output, an unknown consumer, Concat) stays
whole, and each of its convs is listed in PruneResult.skipped with the reason. Concat is refused
rather than handled: its consumers see channel offsets, so one mask per group would not do.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .macs import node_keys, total_macs

Array = npt.NDArray[np.generic]
Index = npt.NDArray[np.intp]
Shape = tuple[int, ...]

_UNARY = frozenset(
    {
        *("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu"),
        *("Selu", "Softplus", "Identity", "MaxPool", "AveragePool", "GlobalAveragePool"),
        *("GlobalMaxPool", "BatchNormalization"),
    }
)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "PRelu"})
_TO_FEATURES = frozenset({"Flatten", "Reshape", "Squeeze"})


@dataclass
class PruneResult:
    """The pruned model, output channels removed per conv, and why other convs were kept."""

    model: onnx.ModelProto
    removed: dict[str, int]
    macs_before: int
    macs_after: int
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Cut:
    """Slice the initializer at node.input[slot] along axis by the mask of tensor's group.

    axis None marks a Reshape target shape, whose channel count is rewritten instead.
    """

    tensor: str
    node: int
    slot: int
    axis: int | None


@dataclass
class _Plan:
    parent: dict[str, str] = field(default_factory=dict)
    sources: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    handled: set[str] = field(default_factory=set)
    taint: dict[str, str] = field(default_factory=dict)
    cuts: list[_Cut] = field(default_factory=list)
    depthwise: list[tuple[str, int]] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)

    def find(self, t: str) -> str:
        self.parent.setdefault(t, t)
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller name wins so the roots do not depend on visiting order.
            self.parent[max(ra, rb)] = min(ra, rb)

    def mark(self, tensor: str, why: str) -> None:
        self.find(tensor)
        self.taint.setdefault(tensor, why)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises assorted errors for malformed graphs
        raise ModelError(f"cannot infer shapes before pruning: {exc}") from exc
    g = inferred.graph
    return {
        v.name: tuple(max(int(d.dim_value), 0) for d in v.type.tensor_type.shape.dim)
        for v in [*g.input, *g.value_info, *g.output]
        if v.type.tensor_type.HasField("shape")
    }


def _conv(plan: _Plan, i: int, node: onnx.NodeProto, inits: dict[str, Array]) -> set[int]:
    w = inits.get(node.input[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    group = _attr(node, "group", 1)
    if w is None or (bias is not None and bias not in inits):
        plan.refused[i] = "weight or bias is not an initializer"
        return set()
    x, y = node.input[0], node.output[0]
    slots = [1] if bias is None else [1, 2]
    if group == 1:
        plan.cuts.append(_Cut(x, i, 1, 1))
        plan.sources[y].append(i)
        plan.find(y)
    elif group == w.shape[0] and w.shape[1] == 1:
        # Depthwise (multiplier 1): channel c out depends on channel c in only, so the mask
        # passes through and the group count follows it.
        plan.union(x, y)
        plan.depthwise.append((x, i))
    else:
        plan.refused[i] = f"grouped convolution (group={group})"
        return set()
    plan.cuts.extend(_Cut(y, i, s, 0) for s in slots)
    plan.handled.add(y)
    return {0}


def _elementwise(
    plan: _Plan, i: int, node: onnx.NodeProto, shapes: dict[str, Shape], inits: dict[str, Array]
) -> set[int]:
    y = node.output[0]
    out = shapes.get(y, ())
    if len(out) < 2:
        return set()
    used: set[int] = set()
    for slot, t in enumerate(node.input):
        dims = inits[t].shape if t in inits else shapes.get(t)
        if not t or dims is None:
            continue
        axis = 1 - (len(out) - len(dims))  # numpy broadcasting aligns trailing axes
        if axis < 0 or dims[axis] != out[1]:
            continue  # broadcast along channels: nothing to slice
        if t in inits:
            if out[1] > 1:
                plan.cuts.append(_Cut(y, i, slot, axis))
        else:
            plan.union(t, y)
            used.add(slot)
    if used:
        plan.handled.add(y)
    return used


def _to_features(
    plan: _Plan, i: int, node: onnx.NodeProto, shapes: dict[str, Shape], inits: dict[str, Array]
) -> set[int]:
    x, y = node.input[0], node.output[0]
    si, so = shapes.get(x, ()), shapes.get(y, ())
    # Only (N, C, 1, ...) -> (N, C): then feature index == channel index.
    if len(so) != 2 or len(si) < 2 or si[:2] != so or any(d != 1 for d in si[2:]):
        return set()
    if node.op_type == "Reshape":
        if node.input[1] not in inits:
            return set()
        plan.cuts.append(_Cut(x, i, 1, None))
    plan.union(x, y)
    plan.handled.add(y)
    return {0}


def _analyse(
    graph: onnx.GraphProto,
    shapes: dict[str, Shape],
    inits: dict[str, Array],
    keys: list[str],
    skip: Collection[str],
) -> _Plan:
    plan = _Plan()
    for i, node in enumerate(graph.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else ""
        extra_outputs = any(node.output[1:])
        used: set[int] = set()
        if op == "Conv" and len(node.input) > 1:
            used = _conv(plan, i, node, inits)
            if keys[i] in skip and 0 in used and i not in plan.refused:
                plan.mark(node.output[0], f"conv {keys[i]} is in skip")
        elif op in _UNARY and not extra_outputs:
            params = range(1, 5) if op == "BatchNormalization" else ()
            if all(node.input[s] in inits for s in params):
                plan.cuts.extend(_Cut(node.input[0], i, s, 0) for s in params)
                plan.union(node.input[0], node.output[0])
                plan.handled.add(node.output[0])
                used = {0}
        elif op in _ELEMENTWISE:
            used = _elementwise(plan, i, node, shapes, inits)
        elif op in _TO_FEATURES:
            used = _to_features(plan, i, node, shapes, inits)
        elif op in ("Gemm", "MatMul") and node.input[1] in inits and inits[node.input[1]].ndim == 2:
            trans_b = _attr(node, "transB", 0) if op == "Gemm" else 0
            if _attr(node, "transA", 0) == 0 and len(shapes.get(node.input[0], ())) == 2:
                plan.cuts.append(_Cut(node.input[0], i, 1, 1 if trans_b else 0))
                used = {0}
        for slot, t in enumerate(node.input):
            if t and t not in inits and slot not in used:
                plan.mark(t, f"consumed by {node.op_type} node {keys[i]}")
    for value in graph.output:
        plan.mark(value.name, f"tensor {value.name} is a graph output")
    return plan


def _masks(
    plan: _Plan,
    graph: onnx.GraphProto,
    inits: dict[str, Array],
    keys: list[str],
    ratio: float,
    min_channels: int,
    skipped: dict[str, str],
) -> dict[str, Index]:
    members: dict[str, list[str]] = defaultdict(list)
    for t in sorted(plan.parent):
        members[plan.find(t)].append(t)
    producer = {o: n.op_type for n in graph.node for o in n.output}
    masks: dict[str, Index] = {}
    for root, tensors in members.items():
        convs = [n for t in tensors for n in plan.sources.get(t, [])]
        if not convs:
            continue
        weights = [inits[graph.node[n].input[1]] for n in convs]
        why = next((plan.taint[t] for t in tensors if t in plan.taint), None)
        if why is None:
            stray = next((t for t in tensors if t not in plan.handled), None)
            if stray is not None:
                source = producer.get(stray)
                why = (
                    f"tensor {stray} comes from a {source} node"
                    if source
                    else f"{stray} is a graph input"
                )
            elif len({w.shape[0] for w in weights}) > 1:
                why = "producers disagree on the channel count"
        if why is not None:
            skipped.update({keys[n]: why for n in convs})
            continue
        channels = weights[0].shape[0]
        norms = sum(np.abs(w.astype(np.float64)).reshape(channels, -1).sum(axis=1) for w in weights)
        drop = min(math.floor(ratio * channels + 1e-9), channels - min(min_channels, channels))
        if drop > 0:
            masks[root] = np.sort(np.argsort(norms, kind="stable")[drop:])
    return masks


def _write(graph: onnx.GraphProto, arrays: dict[tuple[int, int], Array]) -> None:
    index = {t.name: k for k, t in enumerate(graph.initializer)}
    refs = Counter(name for n in graph.node for name in n.input if name in index)
    taken = {t for n in graph.node for t in [*n.input, *n.output]} | set(index)
    for (i, slot), array in sorted(arrays.items()):
        node = graph.node[i]
        name = node.input[slot]
        if refs[name] == 1:
            graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(array, name))
            continue
        # A shared initializer keeps its other users' values; this user gets its own copy.
        refs[name] -= 1
        fresh = next(
            f"{name}_pruned{k}" for k in range(len(taken) + 1) if f"{name}_pruned{k}" not in taken
        )
        taken.add(fresh)
        graph.initializer.append(numpy_helper.from_array(array, fresh))
        node.input[slot] = fresh
    # IR < 4 models may list initializers as inputs; their declared shapes must follow.
    dims = {t.name: (t.data_type, list(t.dims)) for t in graph.initializer}
    for value in graph.input:
        if value.name in dims:
            dtype, shape = dims[value.name]
            value.CopyFrom(helper.make_tensor_value_info(value.name, dtype, shape))


def prune_channels(
    model: onnx.ModelProto,
    ratio: float,
    *,
    min_channels: int = 4,
    skip: Collection[str] = (),
) -> PruneResult:
    """Remove the lowest-L1 `ratio` of output channels from every prunable conv group."""
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be at least 1, got {min_channels}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    keys = node_keys(graph)
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    plan = _analyse(graph, _shapes(out), inits, keys, skip)
    skipped = {keys[i]: why for i, why in plan.refused.items()}
    masks = _masks(plan, graph, inits, keys, ratio, min_channels, skipped)
    macs_before = total_macs(model)
    if not masks:
        return PruneResult(out, {}, macs_before, macs_before, skipped)
    arrays: dict[tuple[int, int], Array] = {}
    for cut in plan.cuts:
        keep = masks.get(plan.find(cut.tensor))
        if keep is None:
            continue
        array = arrays.get((cut.node, cut.slot), inits[graph.node[cut.node].input[cut.slot]])
        if cut.axis is None:
            array = array.copy()
            if array[1] > 0:  # 0 (copy) and -1 (infer) already follow the input
                array[1] = len(keep)
        else:
            array = np.take(array, keep, axis=cut.axis)
        arrays[(cut.node, cut.slot)] = array
    removed: dict[str, int] = {}
    for tensor, sources in plan.sources.items():
        for i in sources:
            if (keep := masks.get(plan.find(tensor))) is not None:
                removed[keys[i]] = inits[graph.node[i].input[1]].shape[0] - len(keep)
    for tensor, i in plan.depthwise:
        if (keep := masks.get(plan.find(tensor))) is not None:
            removed[keys[i]] = inits[graph.node[i].input[1]].shape[0] - len(keep)
            node = graph.node[i]
            node.attribute.remove(next(a for a in node.attribute if a.name == "group"))
            node.attribute.append(helper.make_attribute("group", len(keep)))
    _write(graph, arrays)
    del graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
        onnx.checker.check_model(out)
    except Exception as exc:  # a failure here is a bug in the surgery, named for the report
        raise ModelError(f"pruned model is inconsistent: {exc}") from exc
    return PruneResult(out, dict(sorted(removed.items())), macs_before, total_macs(out), skipped)
