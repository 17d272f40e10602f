"""Truncated-SVD factorisation of Gemm, MatMul and 1x1 Conv weights into two thinner layers.

W (in x out) ~ P Q with P = U_r S_r^(1/2) and Q = S_r^(1/2) V_r^T: splitting the singular values
evenly keeps both factors on a similar scale, which INT8 per-channel quantization then prefers.
The rank r is the smallest that keeps `energy` of the squared singular values, and a layer is
only factored when r (in + out) <= (1 - min_saving) in * out, so every factored layer is cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .macs import node_keys, total_macs

F64 = npt.NDArray[np.float64]


@dataclass
class LowRankResult:
    """The factored model, (rank, full rank) per factored node, and MACs before and after."""

    model: onnx.ModelProto
    factored: dict[str, tuple[int, int]]
    macs_before: int
    macs_after: int


def choose_rank(singular: npt.ArrayLike, energy: float) -> int:
    """Smallest r whose leading singular values hold `energy` of the squared sum."""
    power = np.asarray(singular, dtype=np.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    share = np.cumsum(power) / total
    # The tolerance keeps an exactly low-rank matrix at its rank despite rounding in the tail.
    return min(int(np.searchsorted(share, energy - 1e-9)) + 1, power.size)


def factor(matrix: npt.ArrayLike, energy: float, min_saving: float) -> tuple[F64, F64] | None:
    """(P, Q) with matrix ~ P @ Q, or None when the rank does not save enough."""
    w = np.asarray(matrix, dtype=np.float64)
    m, n = w.shape
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    r = choose_rank(s, energy)
    if r == 0 or r * (m + n) > (1 - min_saving) * m * n:
        return None
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def _attrs(node: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {a.name: a for a in node.attribute}


def _as_matrix(node: onnx.NodeProto, weights: dict[str, F64]) -> F64 | None:
    """The weight as an (in x out) matrix when the node can be factored, else None."""
    w = weights.get(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    attrs = _attrs(node)
    if node.op_type == "Gemm" and w.ndim == 2:
        return w.T if "transB" in attrs and attrs["transB"].i else w
    if node.op_type == "MatMul" and w.ndim == 2:
        return w
    if node.op_type != "Conv" or w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return None
    # Explicit or SAME padding of a 1x1 kernel would still pad; only unpadded convs factor.
    padded = any(attrs["pads"].ints) if "pads" in attrs else False
    auto_pad = attrs["auto_pad"].s if "auto_pad" in attrs else b"NOTSET"
    group = attrs["group"].i if "group" in attrs else 1
    if padded or auto_pad not in (b"NOTSET", b"VALID") or group != 1:
        return None
    matrix: F64 = w.reshape(w.shape[0], w.shape[1]).T
    return matrix


class _Names:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.taken = {t for n in graph.node for t in [n.name, *n.input, *n.output]}
        self.taken |= {t.name for t in graph.initializer} | {v.name for v in graph.input}

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}{k}"
        self.taken.add(name)
        return name


def _replace(
    node: onnx.NodeProto,
    key: str,
    pair: tuple[F64, F64],
    spatial: int,
    names: _Names,
    inits: list[onnx.TensorProto],
) -> list[onnx.NodeProto]:
    p, q = pair
    a_name, b_name = names.fresh(f"{node.input[1]}_lr_a"), names.fresh(f"{node.input[1]}_lr_b")
    hidden = names.fresh(f"{node.output[0]}_lowrank")
    first, second = names.fresh(f"{key}_lr1"), names.fresh(f"{key}_lr2")
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    if node.op_type == "Conv":
        ones = [1] * spatial
        a, b = p.T.reshape(-1, p.shape[0], *ones), q.T.reshape(-1, q.shape[0], *ones)
        # The first conv keeps stride and dilation; the second is a plain 1x1, stride 1.
        nodes = [
            helper.make_node("Conv", [node.input[0], a_name], [hidden], first),
            helper.make_node("Conv", [hidden, b_name, *bias], [node.output[0]], second),
        ]
        nodes[0].attribute.extend(node.attribute)
    elif node.op_type == "Gemm":
        a, b = p, q
        # alpha and transA act on the product, beta on the bias: Y stays alpha A W + beta C.
        nodes = [
            helper.make_node("Gemm", [node.input[0], a_name], [hidden], first),
            helper.make_node("Gemm", [hidden, b_name, *bias], [node.output[0]], second),
        ]
        for attr in node.attribute:
            if attr.name in ("alpha", "transA", "beta"):
                nodes[1 if attr.name == "beta" else 0].attribute.append(attr)
    else:
        a, b = p, q
        nodes = [
            helper.make_node("MatMul", [node.input[0], a_name], [hidden], first),
            helper.make_node("MatMul", [hidden, b_name], [node.output[0]], second),
        ]
    inits.append(numpy_helper.from_array(a.astype(np.float32), a_name))
    inits.append(numpy_helper.from_array(b.astype(np.float32), b_name))
    return nodes


def low_rank(
    model: onnx.ModelProto, *, energy: float = 0.95, min_saving: float = 0.25
) -> LowRankResult:
    """Factor every Gemm, MatMul and 1x1 Conv whose weight is low-rank enough to pay off."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {
        t.name: numpy_helper.to_array(t).astype(np.float64)
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }
    names = _Names(graph)
    factored: dict[str, tuple[int, int]] = {}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    for node, key in zip(list(graph.node), node_keys(graph), strict=True):
        matrix = _as_matrix(node, weights) if node.domain in ("", "ai.onnx") else None
        pair = factor(matrix, energy, min_saving) if matrix is not None else None
        if pair is None or matrix is None:
            nodes.append(node)
            continue
        spatial = weights[node.input[1]].ndim - 2 if node.op_type == "Conv" else 0
        nodes.extend(_replace(node, key, pair, spatial, names, new_inits))
        replaced.add(node.input[1])
        factored[key] = (pair[0].shape[1], min(matrix.shape))
    macs_before = total_macs(model)
    if not factored:
        return LowRankResult(out, {}, macs_before, macs_before)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {t for n in graph.node for t in n.input}
    # Old IR models may list a weight as a graph input too: it then has to stay.
    used |= {v.name for v in graph.input}
    keep = [t for t in graph.initializer if t.name in used or t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
        onnx.checker.check_model(out)
    except Exception as exc:  # a failure here is a bug in the rewrite, named for the report
        raise ModelError(f"low-rank model is inconsistent: {exc}") from exc
    return LowRankResult(out, factored, macs_before, total_macs(out))
