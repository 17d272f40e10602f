"""Cut a (QDQ) model into stages at articulation tensors and attach pooled exit features.

A cut tensor must be one every path from the input to the output goes through, or a later
stage would need tensors an earlier stage did not pass on (a residual skip across the cut).
In a QDQ model we cut at QuantizeLinear outputs, so uint8 tensors pass between stages and the
staged run is bit-identical to the whole model (EDGE-NOTES).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import helper

from .errors import ModelError


@dataclass(frozen=True)
class StageGraph:
    """One stage: its model and the tensor names it reads, passes on and exits with."""

    model: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    exit_output: str
    # The pooling branch of an early exit as its own graph (cut tensor -> features): kept out
    # of the stage because onnxruntime runs every node of a session whether fetched or not.
    exit_model: onnx.ModelProto | None = None


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def articulation_tensors(model: onnx.ModelProto) -> list[str]:
    """Tensors, in topological order, whose removal disconnects the input from the output."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    (source,) = [i.name for i in graph.input if i.name not in inits]
    target = graph.output[0].name
    consumers = _consumers(graph)
    order = [o for n in graph.node for o in n.output if o]

    def reaches_without(blocked: str) -> bool:
        seen, stack = {source}, [source]
        while stack:
            t = stack.pop()
            if t == target:
                return True
            for node in consumers.get(t, []):
                for o in node.output:
                    if o and o != blocked and o not in seen:
                        seen.add(o)
                        stack.append(o)
        return False

    return [t for t in order if t != target and not reaches_without(t)]


def quantized_alias(model: onnx.ModelProto, tensor: str) -> str:
    """The uint8 output of the QuantizeLinear that consumes tensor, if there is exactly one."""
    qls = [n for n in _consumers(model.graph).get(tensor, []) if n.op_type == "QuantizeLinear"]
    return qls[0].output[0] if len(qls) == 1 else tensor


def _producer_op(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    found: onnx.NodeProto | None = next((n for n in model.graph.node if tensor in n.output), None)
    return found


def _spatial(model: onnx.ModelProto, tensor: str) -> tuple[int, int] | None:
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if vi.name == tensor:
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            if len(dims) == 4 and dims[2] > 0 and dims[3] > 0:
                return dims[2], dims[3]
    return None


def add_exit_features(
    model: onnx.ModelProto, cuts: list[str], grid: int = 1
) -> tuple[onnx.ModelProto, list[str]]:
    """Add average pooling to a grid x grid map + Flatten after each cut, as graph outputs.

    grid=1 is global average pooling. A 2x2 grid keeps coarse layout (where in the frame
    a feature fired), which early heads need: GAP alone loses it. uint8 cuts are dequantized
    first.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names: list[str] = []
    for k, cut in enumerate(cuts):
        src = cut
        producer = _producer_op(model, cut)
        if producer is not None and producer.op_type == "QuantizeLinear":
            deq = f"edgefleet_exit{k}_dq"
            model.graph.node.append(
                helper.make_node(
                    "DequantizeLinear",
                    [cut, *producer.input[1:3]],
                    [deq],
                    name=f"edgefleet_exit{k}_DequantizeLinear",
                )
            )
            src = deq
        pooled, flat = f"edgefleet_exit{k}_pool", f"edgefleet_exit{k}_features"
        hw = _spatial(model, cut) if grid > 1 else None
        if hw is not None and hw[0] >= grid and hw[1] >= grid:
            kernel = [hw[0] // grid, hw[1] // grid]
            pool = helper.make_node(
                "AveragePool",
                [src],
                [pooled],
                name=f"edgefleet_exit{k}_pool",
                kernel_shape=kernel,
                strides=kernel,
            )
        else:
            pool = helper.make_node(
                "GlobalAveragePool", [src], [pooled], name=f"edgefleet_exit{k}_gap"
            )
        flatten = helper.make_node("Flatten", [pooled], [flat], name=f"edgefleet_exit{k}_flatten")
        model.graph.node.extend([pool, flatten])
        model.graph.output.append(onnx.ValueInfoProto(name=flat))
        names.append(flat)
    return model, names


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    try:
        sub = onnx.utils.Extractor(inferred).extract_model(inputs, outputs)
    except Exception as exc:  # onnx raises assorted errors for impossible cuts
        raise ModelError(f"cannot extract stage {inputs} -> {outputs}: {exc}") from exc
    sub.ir_version = model.ir_version
    del sub.opset_import[:]
    sub.opset_import.extend(model.opset_import)
    return sub


def split_stages(model: onnx.ModelProto, cuts: list[str], grid: int = 1) -> list[StageGraph]:
    """Stages of model at the given cut tensors (in order), each with pooled exit features."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    (image,) = [i.name for i in graph.input if i.name not in inits]
    final = graph.output[0].name
    articulation = set(articulation_tensors(model))
    for cut in cuts:
        if cut not in articulation:
            raise ModelError(
                f"tensor {cut!r} is not a valid cut point: some path from input to output "
                "bypasses it (e.g. a residual connection across it)"
            )
    with_exits, features = add_exit_features(model, cuts, grid)
    stages: list[StageGraph] = []
    prev = image
    for cut, feat in zip(cuts, features, strict=True):
        sub = _extract(model, [prev], [cut])
        branch = _extract(with_exits, [cut], [feat])
        stages.append(StageGraph(sub, [prev], [cut], feat, branch))
        prev = cut
    last = _extract(model, [prev], [final])
    stages.append(StageGraph(last, [prev], [], final))
    return stages
