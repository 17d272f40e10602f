"""Cut a (QDQ) model into stages at articulation tensors and attach pooled exit features.

A cut tensor must be one every path from the input to the output goes through, or a later
stage would need tensors an earlier stage did not pass on (a residual skip across the cut).
In a QDQ model we cut at QuantizeLinear outputs, so uint8 tensors pass between stages and the
staged run is bit-identical to the whole model (EDGE-NOTES).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import onnx
from onnx import helper

from .errors import ModelError
from .exit_graph import (
    QuantParams,
    branch_model,
    integer_pooling_nodes,
    pooling_cells,
    quant_params,
)


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


def _dims_4d(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Every 4-D tensor with static C, H and W, by name (one shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if len(dims) == 4 and all(d > 0 for d in dims[1:]):
            found[vi.name] = dims
    return found


def uint8_cuts(model: onnx.ModelProto, cuts: list[str]) -> dict[str, tuple[list[int], QuantParams]]:
    """(NCHW dims, quantization) of the cuts that are per-tensor QuantizeLinear outputs."""
    dims = _dims_4d(model)
    found: dict[str, tuple[list[int], QuantParams]] = {}
    for cut in cuts:
        producer = _producer_op(model, cut)
        if producer is None or producer.op_type != "QuantizeLinear" or cut not in dims:
            continue
        params = quant_params(model, producer)
        if params is not None:
            found[cut] = (dims[cut], params)
    return found


def add_exit_features(
    model: onnx.ModelProto, cuts: list[str], grid: int = 1
) -> tuple[onnx.ModelProto, list[str]]:
    """Add each cut's pooled exit features (grid x grid, channel-major) as graph outputs.

    grid=1 is global average pooling. A 2x2 grid keeps coarse layout (where in the frame
    a feature fired), which early heads need: GAP alone loses it. uint8 cuts are pooled in
    integers (exit_graph), exactly as the shipped exit branch does; float cuts by AveragePool.
    """
    quantized = uint8_cuts(model, cuts)
    shapes = _dims_4d(model) if grid > 1 else {}
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names: list[str] = []
    for k, cut in enumerate(cuts):
        flat = f"edgefleet_exit{k}_features"
        quant = quantized.get(cut)
        if quant is not None:
            dims, params = quant
            nodes, inits = integer_pooling_nodes(
                cut, dims, params, grid, "nchw", flat, f"edgefleet_exit{k}"
            )
            model.graph.node.extend(nodes)
            model.graph.initializer.extend(inits)
        else:
            model.graph.node.extend(_float_pooling(cut, shapes.get(cut), grid, k, flat))
        model.graph.output.append(onnx.ValueInfoProto(name=flat))
        names.append(flat)
    return model, names


def _float_pooling(
    cut: str, dims: list[int] | None, grid: int, k: int, flat: str
) -> list[onnx.NodeProto]:
    pooled = f"edgefleet_exit{k}_pool"
    g, kh, kw = pooling_cells(dims[2], dims[3], grid) if dims else (1, 0, 0)
    if g > 1:
        pool = helper.make_node(
            "AveragePool", [cut], [pooled], name=pooled, kernel_shape=[kh, kw], strides=[kh, kw]
        )
    else:
        pool = helper.make_node("GlobalAveragePool", [cut], [pooled], name=f"edgefleet_exit{k}_gap")
    flatten = helper.make_node("Flatten", [pooled], [flat], name=f"edgefleet_exit{k}_flatten")
    return [pool, flatten]


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


Layout = Literal["auto", "nchw", "nhwc"]
NHWC_SUFFIX = "_nhwc"
_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def resolve_layout(layout: Layout, model: onnx.ModelProto) -> Literal["nchw", "nhwc"]:
    """auto: channels-last boundaries for QDQ models (where onnxruntime's CPU provider works
    channels-last), channels-first otherwise (fp32 runs in NCHWc blocks, GPUs prefer NCHW)."""
    if layout != "auto":
        return layout
    return "nhwc" if any(n.op_type == "QuantizeLinear" for n in model.graph.node) else "nchw"


def _emit_nhwc(model: onnx.ModelProto, tensor: str, dims: list[int]) -> str:
    """Replace graph output tensor (NCHW) by tensor + _nhwc, transposed to NHWC."""
    graph = model.graph
    name = tensor + NHWC_SUFFIX
    graph.node.append(
        helper.make_node("Transpose", [tensor], [name], perm=_TO_NHWC, name=name + "_Transpose")
    )
    (pos,) = [i for i, o in enumerate(graph.output) if o.name == tensor]
    graph.output[pos].CopyFrom(
        helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, [dims[i] for i in _TO_NHWC])
    )
    return name


def _accept_nhwc(model: onnx.ModelProto, tensor: str, dims: list[int]) -> None:
    """Replace graph input tensor (NCHW) by tensor + _nhwc and transpose it back first."""
    graph = model.graph
    name = tensor + NHWC_SUFFIX
    (pos,) = [i for i, v in enumerate(graph.input) if v.name == tensor]
    graph.input[pos].CopyFrom(
        helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, [dims[i] for i in _TO_NHWC])
    )
    graph.node.insert(
        0, helper.make_node("Transpose", [name], [tensor], perm=_TO_NCHW, name=name + "_Transpose")
    )


def split_stages(
    model: onnx.ModelProto, cuts: list[str], grid: int = 1, layout: Layout = "nchw"
) -> list[StageGraph]:
    """Stages of model at the given cut tensors (in order), each with its exit branch graph.

    With the nhwc layout, 4-D uint8 cut tensors pass between stages channels-last:
    onnxruntime's CPU provider runs QLinearConv channels-last and wraps each NCHW graph input
    and output in a Transpose, which cancel inside one model but not across a stage boundary
    (measured on the reference model: ~47 us per frame, ~6% of its INT8 time). An explicit
    NCHW->NHWC at the end of a stage and NHWC->NCHW at the start of the next cancel against
    onnxruntime's own. Transposes are exact: the staged run stays bit-identical.
    """
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
    nhwc = resolve_layout(layout, model) == "nhwc"
    with_exits, features = add_exit_features(model, cuts, grid)
    quantized = uint8_cuts(model, cuts)
    stages: list[StageGraph] = []
    prev, prev_quant = image, None
    for cut, feat in zip(cuts, features, strict=True):
        sub = _extract(model, [prev], [cut])
        quant = quantized.get(cut)
        inputs, outputs = [prev], [cut]
        if prev_quant is not None and nhwc:
            _accept_nhwc(sub, prev, prev_quant[0])
            inputs = [prev + NHWC_SUFFIX]
        if quant is None:
            branch = _extract(with_exits, [cut], [feat])
        else:
            dims, params = quant
            passed, shape = cut, dims
            lay: Literal["nchw", "nhwc"] = "nchw"
            if nhwc:
                passed, lay, shape = _emit_nhwc(sub, cut, dims), "nhwc", [dims[i] for i in _TO_NHWC]
                outputs = [passed]
            branch = branch_model(
                passed, shape, params, grid, lay, feat, list(model.opset_import), model.ir_version
            )
        stages.append(StageGraph(sub, inputs, outputs, feat, branch))
        prev, prev_quant = cut, quant
    last = _extract(model, [prev], [final])
    inputs = [prev]
    if prev_quant is not None and nhwc:
        _accept_nhwc(last, prev, prev_quant[0])
        inputs = [prev + NHWC_SUFFIX]
    stages.append(StageGraph(last, inputs, [], final))
    return stages
