"""Staged early-exit execution of a verified bundle with real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.bundle import generate_private_key, verify_bundle, write_bundle
from edgefleet.agent.runtime.staged import StagedModel
from tests.bundle_helpers import two_stage_body, two_stage_files


@pytest.fixture
def model(tmp_path: Path) -> StagedModel:
    key = generate_private_key()
    write_bundle(tmp_path / "b", two_stage_body(), two_stage_files(seed=3), key)
    return StagedModel(verify_bundle(tmp_path / "b", [key.public_key()]))


def _inputs(n: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 1, 1, 8, 8)).astype(np.float32)


def test_threshold_zero_always_exits_early(model: StagedModel) -> None:
    model.set_thresholds([0.0])
    for x in _inputs(5):
        pred = model.predict(x)
        assert pred.exit_index == 0
        assert len(pred.stage_ms) == 1


def test_disabled_exit_runs_to_the_end_and_matches_the_final_head(model: StagedModel) -> None:
    model.set_thresholds([None])
    for x in _inputs(5):
        pred = model.predict(x)
        assert pred.exit_index == 1
        assert len(pred.stage_ms) == 2
        final = model.all_exit_logits(x)[-1]
        assert pred.class_index == int(final.argmax())


def test_predict_agrees_with_batch_classification(model: StagedModel) -> None:
    xs = _inputs(40)
    for thresholds in ([0.4], [0.6], [None], [0.0]):
        model.set_thresholds(thresholds)
        batch = np.concatenate(list(xs))
        classes, exits = model.classify_batch(batch)
        single = [model.predict(x) for x in xs]
        assert [p.class_index for p in single] == classes.tolist()
        assert [p.exit_index for p in single] == exits.tolist()


def test_default_operating_point_thresholds(model: StagedModel) -> None:
    assert model.thresholds == [0.95]
    with pytest.raises(ValueError, match="2 thresholds for 1 early exit"):
        model.set_thresholds([0.5, 0.5])


def test_dynamic_shapes_run_through_plain_session_run(model: StagedModel) -> None:
    from edgefleet.agent.runtime.chain import PlainChain

    # This bundle keeps a dynamic batch dim (classify_batch feeds 40 at once): no bound
    # buffers, and predict() still works frame by frame (the tests above).
    assert isinstance(model._chain, PlainChain)


def test_warm_up_runs_every_stage_and_changes_nothing(model: StagedModel) -> None:
    from edgefleet.agent.runtime.chain import PlainChain

    assert isinstance(model._chain, PlainChain)  # stages run through session.run: countable
    calls: list[int] = []

    class Counted:
        def __init__(self, k: int, sess: object) -> None:
            self.k, self.sess = k, sess

        def run(self, *args: object) -> object:
            calls.append(self.k)
            return self.sess.run(*args)  # type: ignore[attr-defined]

    model._chain.sessions = [Counted(k, s) for k, s in enumerate(model._chain.sessions)]  # type: ignore[misc]
    model.set_thresholds([0.4])
    before = [model.predict(x) for x in _inputs(6)]
    calls.clear()
    assert model.warm_up(runs=2) > 0
    assert calls == [0, 1, 0, 1]  # every stage, every run: the exit never fired
    assert model.thresholds == [0.4]
    after = [model.predict(x) for x in _inputs(6)]
    assert [(p.class_index, p.exit_index) for p in after] == [
        (p.class_index, p.exit_index) for p in before
    ]


def test_a_missing_execution_provider_is_one_warning_and_cpu_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    key = generate_private_key()
    write_bundle(tmp_path / "b", two_stage_body(), two_stage_files(seed=3), key)
    verified = verify_bundle(tmp_path / "b", [key.public_key()])
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.runtime"):
        model = StagedModel(verified, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert model.sessions[0].get_providers() == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(
        "execution providers NoSuchExecutionProvider not in this onnxruntime build"
    )
    assert model.predict(_inputs(1)[0]).exit_index in (0, 1)


def test_direct_and_public_iobinding_calls_write_the_same_outputs() -> None:
    """The C++ shortcut and the public wrapper it falls back to compute the same thing."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgefleet.agent.runtime.chain import _direct_call

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime the agent supports reads
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    outs = [np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)]

    class PublicOnly:  # an onnxruntime without the private names
        def __init__(self, inner: ort.InferenceSession) -> None:
            self.run_with_iobinding = inner.run_with_iobinding

    for out, target in zip(outs, [sess, PublicOnly(sess)], strict=True):
        binding = sess.io_binding()
        binding.bind_input("x", "cpu", 0, np.float32, [1, 4], x.ctypes.data)
        binding.bind_output("y", "cpu", 0, np.float32, [1, 4], out.ctypes.data)
        _direct_call(target, binding)()  # type: ignore[arg-type]
    assert np.array_equal(outs[0], x * x) and np.array_equal(outs[1], x * x)
