"""The graph that turns a cut tensor into an exit's pooled features.

An exit head reads the cut tensor average-pooled to a grid x grid map (grid 1 = global), then
flattened channel-major (c, y, x), as AveragePool + Flatten order it on NCHW.

For a uint8 cut (a QDQ model) the pooling is done in integers: one MatMulInteger with a 0/1
pooling matrix sums (x - zero_point) over each cell exactly, then a single multiply by
scale / cell size gives the mean in real units. This is

* fast: on the reference model a dequantize + NCHWc reorder + float AveragePool cost ~50 us
  per frame for a 32x32x64 map; the integer sum reads the uint8 map once;
* layout-independent: the NCHW graph the optimizer fits heads on and the NHWC graph a device
  runs compute the same integer sums and the same float multiply, so their features are
  bit-identical and the calibrated thresholds mean the same on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

Layout = Literal["nchw", "nhwc"]


@dataclass(frozen=True)
class QuantParams:
    """Per-tensor uint8 quantization of a cut: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


def pooling_cells(height: int, width: int, grid: int) -> tuple[int, int, int]:
    """(cells per side, cell height, cell width) as AveragePool with kernel = stride = size//grid.

    Trailing rows and columns that do not fill a cell are left out, as AveragePool does; a map
    smaller than the grid is pooled globally.
    """
    if grid <= 1 or height < grid or width < grid:
        return 1, height, width
    return grid, height // grid, width // grid


def pooling_matrix(height: int, width: int, grid: int) -> npt.NDArray[np.uint8]:
    """0/1 matrix (cells, height*width): row gy*g+gx marks the pixels of cell (gy, gx)."""
    g, kh, kw = pooling_cells(height, width, grid)
    p = np.zeros((g * g, height, width), np.uint8)
    for gy in range(g):
        for gx in range(g):
            p[gy * g + gx, gy * kh : (gy + 1) * kh, gx * kw : (gx + 1) * kw] = 1
    return p.reshape(g * g, height * width)


def integer_pooling_nodes(
    source: str,
    dims: list[int],
    params: QuantParams,
    grid: int,
    layout: Layout,
    output: str,
    prefix: str,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers: uint8 `source` (dims in its own layout) -> float `output`.

    output is (N, C*cells) in channel-major order whatever the source layout.
    """
    if layout == "nchw":
        _, c, h, w = dims
    else:
        _, h, w, c = dims
    _, kh, kw = pooling_cells(h, w, grid)
    pm = pooling_matrix(h, w, grid)
    zp = np.array(params.zero_point, np.uint8)
    names = {k: f"{prefix}_{k}" for k in ("shape", "pool", "zp", "zero", "factor", "flat")}
    inits = [
        numpy_helper.from_array(np.array(params.scale / (kh * kw), np.float32), names["factor"]),
        numpy_helper.from_array(zp, names["zp"]),
        numpy_helper.from_array(np.array(0, np.uint8), names["zero"]),
        numpy_helper.from_array(np.array([0, -1], np.int64), names["flat"]),
    ]
    rows, summed, cast = f"{prefix}_rows", f"{prefix}_sums", f"{prefix}_sums_f"
    nodes: list[onnx.NodeProto] = []
    if layout == "nchw":
        # (N, C, HW) @ (HW, cells) -> (N, C, cells)
        inits += [
            numpy_helper.from_array(np.array([0, c, h * w], np.int64), names["shape"]),
            numpy_helper.from_array(np.ascontiguousarray(pm.T), names["pool"]),
        ]
        nodes += [
            helper.make_node("Reshape", [source, names["shape"]], [rows], name=rows),
            helper.make_node(
                "MatMulInteger",
                [rows, names["pool"], names["zp"], names["zero"]],
                [summed],
                name=summed,
            ),
        ]
        channel_major = summed
    else:
        # (cells, HW) @ (N, HW, C) -> (N, cells, C), then channel-major
        inits += [
            numpy_helper.from_array(np.array([0, h * w, c], np.int64), names["shape"]),
            numpy_helper.from_array(pm, names["pool"]),
        ]
        channel_major = f"{prefix}_sums_cmajor"
        nodes += [
            helper.make_node("Reshape", [source, names["shape"]], [rows], name=rows),
            helper.make_node(
                "MatMulInteger",
                [names["pool"], rows, names["zero"], names["zp"]],
                [summed],
                name=summed,
            ),
            helper.make_node(
                "Transpose", [summed], [channel_major], perm=[0, 2, 1], name=channel_major
            ),
        ]
    scaled = f"{prefix}_mean"
    nodes += [
        helper.make_node("Cast", [channel_major], [cast], to=onnx.TensorProto.FLOAT, name=cast),
        helper.make_node("Mul", [cast, names["factor"]], [scaled], name=scaled),
        helper.make_node("Reshape", [scaled, names["flat"]], [output], name=output),
    ]
    return nodes, inits


def branch_model(
    cut: str,
    dims: list[int],
    params: QuantParams,
    grid: int,
    layout: Layout,
    output: str,
    opset: list[onnx.OperatorSetIdProto],
    ir_version: int,
) -> onnx.ModelProto:
    """A stand-alone exit branch: uint8 cut tensor (in the given layout) -> pooled features."""
    nodes, inits = integer_pooling_nodes(cut, dims, params, grid, layout, output, "edgefleet_x")
    n, c, h, w = dims if layout == "nchw" else [dims[0], dims[3], dims[1], dims[2]]
    g = pooling_cells(h, w, grid)[0]
    graph = helper.make_graph(
        nodes,
        "edgefleet_exit_branch",
        [helper.make_tensor_value_info(cut, onnx.TensorProto.UINT8, dims)],
        [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [n, c * g * g])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=list(opset))
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def quant_params(model: onnx.ModelProto, node: onnx.NodeProto) -> QuantParams | None:
    """Per-tensor uint8 scale and zero point of a QuantizeLinear node, when constant."""
    inits = {i.name: i for i in model.graph.initializer}
    if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
        return None
    scale = numpy_helper.to_array(inits[node.input[1]])
    zp = numpy_helper.to_array(inits[node.input[2]])
    if scale.size != 1 or zp.size != 1 or zp.dtype != np.uint8:
        return None
    return QuantParams(float(scale.reshape(())), int(zp.reshape(())))
