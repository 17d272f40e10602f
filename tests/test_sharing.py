"""k-means weight sharing, run with real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgefleet.server.optimize.runner import make_session
from edgefleet.server.optimize.sharing import compressed_size, kmeans_1d, share_weights
from tests.optimize_models import Builder, conv_bn_model, mlp_model, random_input, residual_model


def _run(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    (out,) = make_session(model).run(None, {"x": random_input(model, seed)})
    return np.asarray(out)


def test_kmeans_1d_finds_separated_clusters() -> None:
    values = np.array([0.0, 0.1, 5.0, 5.1, 9.9, 10.0])
    np.testing.assert_allclose(kmeans_1d(values, 3), [0.05, 0.05, 5.05, 5.05, 9.95, 9.95])
    np.testing.assert_array_equal(kmeans_1d(values, 6), values)


def test_compressed_size_is_gzip() -> None:
    assert compressed_size(b"a" * 10000) < 100
    assert compressed_size(b"") > 0


@pytest.mark.parametrize("build", [conv_bn_model, residual_model])
def test_enough_clusters_change_nothing(build: Builder) -> None:
    model = build()
    result = share_weights(model, clusters=4096, min_size=64)
    assert result.tensors == {}
    np.testing.assert_array_equal(_run(result.model), _run(model))


@pytest.mark.parametrize("build", [conv_bn_model, residual_model, mlp_model])
def test_sixteen_clusters_per_channel(build: Builder) -> None:
    model = build()
    before = model.SerializeToString()
    result = share_weights(model, clusters=16, min_size=64)
    assert model.SerializeToString() == before
    assert result.tensors and set(result.tensors.values()) == {16}
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name in result.tensors:
        w = weights[name]
        # Conv and transB Gemm weights hold output channels on axis 0, MatMul on axis 1.
        rows = w.T if name == "w2" else w.reshape(w.shape[0], -1)
        assert max(np.unique(row).size for row in rows) <= 16
    for seed in range(3):
        ref, got = _run(model, seed), _run(result.model, seed)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
    assert result.compressed_bytes_after < result.compressed_bytes_before
    assert result.raw_bytes == len(result.model.SerializeToString())


def test_whole_tensor_sharing() -> None:
    result = share_weights(conv_bn_model(), clusters=8, min_size=64, per_channel=False)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert result.tensors == {"conv1_w": 8, "conv2_w": 8, "fc_w": 8}
    assert all(np.unique(weights[n]).size == 8 for n in result.tensors)


def test_min_size_skips_small_tensors() -> None:
    result = share_weights(conv_bn_model(), min_size=1024)
    assert set(result.tensors) == {"conv2_w"}  # 16 x 8 x 3 x 3; conv1 has 216 weights


def test_deterministic() -> None:
    model = residual_model()
    first = share_weights(model, clusters=16, min_size=64)
    second = share_weights(model, clusters=16, min_size=64)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.compressed_bytes_after == second.compressed_bytes_after


def test_bad_cluster_count() -> None:
    with pytest.raises(ValueError, match="clusters"):
        share_weights(conv_bn_model(), clusters=1)
