"""Small fp32 ONNX models with random weights for the compression passes (prune, low rank, share).

`zero` arguments name channels whose filters and biases are exactly zero (and whose BN maps zero
to zero), so pruning them must leave the outputs unchanged: an exact check of the surgery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = npt.NDArray[np.float32]
Builder = Callable[[], onnx.ModelProto]


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def const(self, name: str, value: npt.ArrayLike) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def rand(self, name: str, *shape: int, zero: Sequence[int] = ()) -> str:
        value = self.rng.normal(0, 1 / np.sqrt(np.prod(shape[1:]) or 1), shape)
        value[list(zero)] = 0
        return self.const(name, value)

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        group: int = 1,
        zero: Sequence[int] = (),
        zero_bias: Sequence[int] = (),
        **attrs: Any,
    ) -> str:
        w = self.rand(f"{name}_w", cout, cin // group, k, k, zero=zero)
        b = self.rand(f"{name}_b", cout, zero=[*zero, *zero_bias])
        pads = [k // 2] * 4
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [name], name=name, group=group, pads=pads, **attrs)
        )
        return name

    def op(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, x_shape: list[int], out: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        # Strict inference rejects a malformed test graph and fills in the output's shape.
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        del model.graph.value_info[:]
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_bn_model(
    zero1: Sequence[int] = (), zero2: Sequence[int] = (), seed: int = 0
) -> onnx.ModelProto:
    """conv(3->8)-BN-relu-mul(per-channel)-conv(8->16)-relu-GAP-flatten-gemm(16->10, transB)."""
    b = _Builder(seed)
    c1 = b.conv("conv1", "x", 3, 8, zero=zero1)
    mean = b.rng.normal(0, 0.1, 8)
    beta = b.rng.normal(0, 0.1, 8)
    mean[list(zero1)] = beta[list(zero1)] = 0  # BN(0) == 0 on the zeroed channels
    scale, var = b.rng.uniform(0.5, 1.5, 8), b.rng.uniform(0.5, 1.5, 8)
    bn_in = [c1, b.const("s", scale), b.const("beta", beta), b.const("m", mean), b.const("v", var)]
    bn = b.op("BatchNormalization", bn_in, "bn")
    r1 = b.op("Relu", [bn], "relu1")
    m = b.op("Mul", [r1, b.const("chscale", b.rng.uniform(0.5, 2, (8, 1, 1)))], "mul")
    r2 = b.op("Relu", [b.conv("conv2", m, 8, 16, zero=zero2)], "relu2")
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [r2], "gap")], "flat")
    b.op("Gemm", [flat, b.rand("fc_w", 10, 16), b.rand("fc_b", 10)], "logits", transB=1)
    return b.model([1, 3, 16, 16], "logits")


def residual_model(
    zero_res: Sequence[int] = (), zero_mid: Sequence[int] = (), seed: int = 1
) -> onnx.ModelProto:
    """conv-relu, then conv-relu-conv added to the skip, relu, GAP, flatten, gemm (no transB)."""
    b = _Builder(seed)
    skip = b.op("Relu", [b.conv("conv0", "x", 3, 8, zero=zero_res)], "relu0")
    mid = b.op("Relu", [b.conv("conv1", skip, 8, 8, zero=zero_mid)], "relu1")
    res = b.conv("conv2", mid, 8, 8, zero=zero_res)
    joined = b.op("Relu", [b.op("Add", [res, skip], "add")], "relu2")
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [joined], "gap")], "flat")
    b.op("Gemm", [flat, b.rand("fc_w", 8, 10), b.rand("fc_b", 10)], "logits")
    return b.model([1, 3, 16, 16], "logits")


def depthwise_model(zero: Sequence[int] = (), seed: int = 2) -> onnx.ModelProto:
    """conv-relu, depthwise conv-clip, pointwise conv-relu, GAP, reshape [1, 16], matmul + add."""
    b = _Builder(seed)
    r0 = b.op("Relu", [b.conv("conv0", "x", 3, 8, zero=zero)], "relu0")
    # The zeroed channels' depthwise bias is zero too, so they stay exactly zero.
    dw = b.conv("dw", r0, 8, 8, group=8, zero_bias=zero)
    clip = b.op("Clip", [dw, b.const("lo", 0.0), b.const("hi", 6.0)], "clip")
    pw = b.op("Relu", [b.conv("pw", clip, 8, 16, k=1)], "relu_pw")
    gap = b.op("GlobalAveragePool", [pw], "gap")
    shape = numpy_helper.from_array(np.array([1, 16], dtype=np.int64), "shape")
    b.inits.append(shape)
    flat = b.op("Reshape", [gap, "shape"], "flat")
    mm = b.op("MatMul", [flat, b.rand("fc_w", 16, 10)], "mm")
    b.op("Add", [mm, b.rand("fc_b", 10)], "logits")
    return b.model([1, 3, 16, 16], "logits")


def low_rank_matrix(rows: int, cols: int, rank: int, rng: np.random.Generator) -> F32:
    """A rows x cols matrix of exactly the given rank, singular values between 1 and 2."""
    left, _ = np.linalg.qr(rng.normal(size=(rows, rank)))
    right, _ = np.linalg.qr(rng.normal(size=(cols, rank)))
    matrix: F32 = ((left * np.linspace(2, 1, rank)) @ right.T).astype(np.float32)
    return matrix


def mlp_model(rank: int | None = 4, trans_b: bool = True, seed: int = 3) -> onnx.ModelProto:
    """Gemm(64->64, rank `rank`, or full rank when None)-relu-MatMul(64->32, rank 4)-add."""
    b = _Builder(seed)
    w1 = low_rank_matrix(64, 64, rank, b.rng) if rank else b.rng.normal(size=(64, 64)) / 8
    b.const("w1", w1.T if trans_b else w1)
    h = b.op("Gemm", ["x", "w1", b.rand("b1", 64)], "fc1", transB=int(trans_b), alpha=0.5, beta=2.0)
    r = b.op("Relu", [h], "relu")
    mm = b.op("MatMul", [r, b.const("w2", low_rank_matrix(64, 32, 4, b.rng))], "fc2")
    b.op("Add", [mm, b.rand("b2", 32)], "logits")
    return b.model([1, 64], "logits")


def pointwise_model(stride: int = 1, seed: int = 4) -> onnx.ModelProto:
    """A 1x1 conv 16->32 with a rank-4 weight (stride as given), then relu."""
    b = _Builder(seed)
    w = low_rank_matrix(32, 16, 4, b.rng).reshape(32, 16, 1, 1)
    b.const("pw_w", w)
    conv_in = ["x", "pw_w", b.rand("pw_b", 32)]
    b.nodes.append(helper.make_node("Conv", conv_in, ["pw"], name="pw", strides=[stride] * 2))
    b.op("Relu", ["pw"], "out")
    return b.model([1, 16, 8, 8], "out")


def input_residual_model(seed: int = 5) -> onnx.ModelProto:
    """A conv added to the graph input (its group cannot change), then a conv to the output."""
    b = _Builder(seed)
    joined = b.op("Add", [b.conv("conv_a", "x", 8, 8), "x"], "add")
    b.conv("conv_out", b.op("Relu", [joined], "relu"), 8, 8)
    return b.model([1, 8, 8, 8], "conv_out")


def concat_model(seed: int = 6) -> onnx.ModelProto:
    """Two convs concatenated on channels, then a conv (Concat is refused)."""
    b = _Builder(seed)
    cat = b.op("Concat", [b.conv("left", "x", 3, 8), b.conv("right", "x", 3, 8)], "cat", axis=1)
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.conv("mix", cat, 16, 8)], "gap")], "f")
    b.op("Gemm", [flat, b.rand("fc_w", 4, 8)], "logits", transB=1)
    return b.model([1, 3, 8, 8], "logits")


def random_input(model: onnx.ModelProto, seed: int = 0) -> F32:
    """A random float input of the model's (fixed) input shape."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(size=dims).astype(np.float32)


def shared_scale_model(seed: int = 7) -> onnx.ModelProto:
    """Two conv branches scaled by one shared (1, 8, 1, 1) constant, each pruned differently."""
    b = _Builder(seed)
    scale = b.const("scale", b.rng.uniform(1, 2, (1, 8, 1, 1)))
    left = b.op("Mul", [b.conv("left", "x", 3, 8, zero=[0, 1, 2, 3]), scale], "mul_l")
    right = b.op("Mul", [b.conv("right", "x", 3, 8, zero=[4, 5, 6, 7]), scale], "mul_r")
    b.op("Add", [b.conv("out_l", left, 8, 4), b.conv("out_r", right, 8, 4)], "out")
    return b.model([1, 3, 8, 8], "out")
