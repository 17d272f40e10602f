"""k-means weight sharing: few distinct values per output channel, so the bundle gzips small.

Bundles travel as .tar.gz. A weight tensor with at most `clusters` distinct values per output
channel stays that way through INT8 per-channel quantization (one scale per channel maps equal
floats to equal codes), and gzip then codes each weight in about log2(clusters) bits. Clustering
is per output channel by default because that is also the axis quantization scales along.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

F64 = npt.NDArray[np.float64]

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class SharingResult:
    """The shared model, clusters used per rewritten initializer, and bundle sizes in bytes.

    clusters used is the most distinct values any one channel (or the whole tensor) kept.
    raw_bytes is the serialized size, the same before and after: sharing only helps gzip.
    """

    model: onnx.ModelProto
    tensors: dict[str, int]
    raw_bytes: int
    compressed_bytes_before: int
    compressed_bytes_after: int


def compressed_size(data: bytes) -> int:
    """Bytes of data after gzip level 9, as bundles travel."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def kmeans_1d(values: npt.ArrayLike, k: int, *, iterations: int = 100) -> F64:
    """The values, flattened, each replaced by its centroid after Lloyd's 1-D k-means."""
    flat: F64 = np.asarray(values, dtype=np.float64).ravel()
    if np.unique(flat).size <= k:
        return np.array(flat, copy=True)
    # Quantile starts spread the centroids where the weights are; repeated values can give
    # equal starts, which np.unique merges rather than leaving clusters empty.
    centroids = np.unique(np.quantile(flat, (np.arange(k) + 0.5) / k))
    for _ in range(iterations):
        # In 1-D the nearest centroid is found by bisecting the midpoints between neighbours.
        label = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
        counts = np.bincount(label, minlength=centroids.size)
        sums = np.bincount(label, weights=flat, minlength=centroids.size)
        moved = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    label = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    shared: F64 = centroids[label]
    return shared


def _weight_axes(graph: onnx.GraphProto) -> dict[str, int | None]:
    """Initializer -> output-channel axis of the weight it is; None when its users disagree."""
    axes: dict[str, int | None] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        # Conv (M, C/g, k..) and transposed Gemm (N, K) hold outputs on axis 0, MatMul and
        # plain Gemm (K, N) on axis 1: the axes per-channel INT8 quantization scales along.
        axis = 0 if node.op_type == "Conv" or trans_b else 1
        name = node.input[1]
        axes[name] = axis if axes.get(name, axis) == axis else None
    return axes


def _share(array: npt.NDArray[np.generic], axis: int | None, clusters: int) -> F64:
    if axis is None:
        return kmeans_1d(array, clusters).reshape(array.shape)
    rows = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    out = np.stack([kmeans_1d(row, clusters) for row in rows.reshape(rows.shape[0], -1)])
    return np.moveaxis(out.reshape(rows.shape), 0, axis)


def _most_distinct(array: npt.NDArray[np.generic], axis: int | None) -> int:
    if axis is None:
        return int(np.unique(array).size)
    rows = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    return max(int(np.unique(row).size) for row in rows)


def share_weights(
    model: onnx.ModelProto,
    *,
    clusters: int = 16,
    min_size: int = 1024,
    per_channel: bool = True,
) -> SharingResult:
    """Cluster every large Conv/Gemm/MatMul weight to at most `clusters` values (per channel)."""
    if clusters < 2:
        raise ValueError(f"clusters must be at least 2, got {clusters}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    axes = _weight_axes(out.graph)
    tensors: dict[str, int] = {}
    for init in out.graph.initializer:
        if init.name not in axes or init.data_type not in _FLOATS:
            continue
        array = numpy_helper.to_array(init)
        if array.size < min_size:
            continue
        # A tensor the users disagree on is clustered whole: then every axis has few values.
        axis = axes[init.name] if per_channel else None
        rewritten = _share(array, axis, clusters).astype(array.dtype)
        if np.array_equal(rewritten, array):
            continue
        init.CopyFrom(numpy_helper.from_array(rewritten, init.name))
        tensors[init.name] = _most_distinct(rewritten, axis)
    before, after = model.SerializeToString(), out.SerializeToString()
    return SharingResult(out, tensors, len(after), compressed_size(before), compressed_size(after))
