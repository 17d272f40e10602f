"""`edgefleet optimize` end to end on the reference model, and every bad input it must refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.bundle import Preprocessing, verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.errors import (
    BudgetError,
    DataError,
    ModelError,
    OutputExistsError,
    QuantizationCollapse,
)
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.optimize.prepare import prepare_model
from edgefleet.server.optimize.quantize import quantize_qdq
from edgefleet.server.optimize.runner import logits_of, make_session
from edgefleet.server.optimize.split import quantized_alias, split_stages
from edgefleet.server.reference import MODEL_PATH, load_reference_split

SPEC = Preprocessing(height=64, width=64, color="GRAY", mean=[0.1307], std=[0.3081])
FAST = {"latency_samples": 20}


@pytest.fixture(scope="module")
def mnist_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mnist.npz"
    return write_splits_npz(load_reference_split(), path)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> FleetKey:
    return init_key(tmp_path_factory.mktemp("keys"))[0]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, mnist_npz: Path, key: FleetKey) -> Path:
    out = tmp_path_factory.mktemp("opt") / "mnist"
    optimize(
        MODEL_PATH, mnist_npz, out, SPEC, key, OptimizeOptions(**FAST), progress=lambda _m: None
    )
    return out


def test_reference_bundle_verifies_and_has_exits(reference_run: Path, key: FleetKey) -> None:
    verified = verify_bundle(reference_run / "bundle", [key.public])
    m = verified.manifest
    assert len(m.stages) >= 2 and m.early_exits
    assert all(s.file.endswith(".onnx") for s in m.stages)
    assert m.preprocessing == SPEC
    assert len(m.operating_points) >= 2
    assert m.provenance.optimizer["quantization"] == "static"
    # QDQ: the stages pass uint8 tensors, the stage files hold int8 weights
    stage0 = onnx.load_from_string(verified.read(m.stages[0].file))
    assert any(n.op_type == "QuantizeLinear" for n in stage0.graph.node)
    assert (reference_run / "report.png").stat().st_size > 10_000


def test_classifier_head_stays_float(reference_run: Path) -> None:
    report = json.loads((reference_run / "report.json").read_text())
    head = report["quantization"]["float_head"]
    assert sorted(head) == ["/head/fc/Gemm", "/head/pool/AveragePool"]
    q = onnx.load(reference_run / "models" / "static.onnx")
    fc = next(n for n in q.graph.node if n.name == "/head/fc/Gemm")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers[fc.input[0]] == "Flatten"  # float features, not a DequantizeLinear
    assert all(producers.get(i) != "DequantizeLinear" for i in fc.input[1:])


def test_float_head_nodes_stop_at_a_large_linear_layer() -> None:
    from edgefleet.server.optimize.quantize import float_head_nodes
    from tests.optimize_models import mlp_model, residual_model

    assert float_head_nodes(mlp_model()) == []  # its MatMuls are all the MACs: keep INT8
    # GAP -> Flatten -> Gemm after the last conv; the walk stops at the residual Relu.
    assert sorted(float_head_nodes(residual_model())) == ["gap", "logits"]


def test_budget_holds_on_validation(reference_run: Path) -> None:
    report = json.loads((reference_run / "report.json").read_text())
    ref = report["budget"]["reference_val_accuracy"]
    ops = report["exits"]["operating_points"]
    default = ops[report["exits"]["default"]]
    assert default["val_accuracy"] >= ref - 0.01 - 1e-9
    assert report["quantization"]["val_accuracy"] >= ref - 0.005 - 1e-9
    # Operating points run from accurate to fast.
    costs = [p["expected_macs"] for p in ops]
    assert costs == sorted(costs, reverse=True)
    assert report["bundle"]["split_identical"] is True
    assert report["test"]["images"] == 1000
    assert abs(sum(report["test"]["exit_rates"]) - 1) < 1e-9


def test_agent_runtime_reproduces_reported_test_accuracy(
    reference_run: Path, key: FleetKey
) -> None:
    """The device path on the bundle gives exactly the accuracy the report claims."""
    report = json.loads((reference_run / "report.json").read_text())
    staged = StagedModel(verify_bundle(reference_run / "bundle", [key.public]))
    images, labels = load_reference_split()["test"]
    pre = Preprocessor(staged.manifest.preprocessing)
    correct = sum(
        staged.predict(pre(img)).class_index == y for img, y in zip(images, labels, strict=True)
    )
    assert correct / len(labels) == pytest.approx(report["test"]["accuracy"])


def test_bound_buffers_and_plain_runs_give_the_same_predictions(
    reference_run: Path, key: FleetKey
) -> None:
    from edgefleet.agent.runtime.chain import BoundChain, PlainChain

    staged = StagedModel(verify_bundle(reference_run / "bundle", [key.public]))
    assert isinstance(staged._chain, BoundChain)  # the optimizer fixes every shape
    plain = StagedModel(verify_bundle(reference_run / "bundle", [key.public]))
    plain._chain = PlainChain(plain._sessions)
    images, _ = load_reference_split()["test"]
    pre = Preprocessor(SPEC)
    frames = [pre(img) for img in images[:150]]
    n_early = len(staged.early_exits)
    for thresholds in (list(staged.thresholds), [None] * n_early, [0.0] * n_early):
        staged.set_thresholds(thresholds)
        plain.set_thresholds(thresholds)
        for x in frames:
            a, b = staged.predict(x), plain.predict(x)
            assert (a.class_index, a.confidence, a.exit_index) == (
                b.class_index,
                b.confidence,
                b.exit_index,
            )


def test_video_frames_preprocessed_into_the_bound_input_predict_the_same(
    reference_run: Path, key: FleetKey
) -> None:
    """The agent's path (frame -> bound input -> direct C++ runs) against plain session.run.

    Real 96x96 BGR video frames, so the colour change, the resize and the planned fast path
    are all exercised; the reference side copies a fresh tensor and calls onnxruntime's
    public run methods.
    """
    from edgefleet.agent.runtime.chain import PlainChain
    from edgefleet.server.reference import VIDEO_PATH

    agent = StagedModel(verify_bundle(reference_run / "bundle", [key.public]))
    plain = StagedModel(verify_bundle(reference_run / "bundle", [key.public]))
    plain._chain = PlainChain(plain._sessions)
    cap = cv2.VideoCapture(str(VIDEO_PATH))
    frames = [cap.read()[1] for _ in range(120)]
    cap.release()
    assert all(f is not None and f.shape == (96, 96, 3) for f in frames)
    pre_agent, pre_plain = Preprocessor(SPEC), Preprocessor(SPEC)
    n_early = len(agent.early_exits)
    for thresholds in (list(agent.thresholds), [None] * n_early, [0.0] * n_early):
        agent.set_thresholds(thresholds)
        plain.set_thresholds(thresholds)
        for frame in frames:
            a, b = agent.predict_frame(frame, pre_agent), plain.predict(pre_plain(frame))
            assert (a.class_index, a.confidence, a.exit_index) == (
                b.class_index,
                b.confidence,
                b.exit_index,
            )
    assert pre_agent._fast is not None  # the planned path was the one compared


def test_staged_int8_equals_unsplit_on_real_images() -> None:
    images, _ = load_reference_split()["validation"]
    x = Preprocessor(SPEC).batch(list(images[:100]))
    prepared = prepare_model(onnx.load(MODEL_PATH), "ref", channels=1, height=64, width=64)
    q = quantize_qdq(prepared.model, prepared.input_name, x[:50], reduce_range=True)
    cuts = [quantized_alias(q, "block1_out"), quantized_alias(q, "block2_out")]
    stages = split_stages(q, cuts, grid=2)
    sessions = [make_session(s.model) for s in stages]
    full = logits_of(q, x)
    for i in range(x.shape[0]):
        feeds = {stages[0].inputs[0]: x[i : i + 1]}
        for sg, sess in zip(stages, sessions, strict=True):
            out = sess.run(sg.outputs or [sg.exit_output], feeds)
            feeds = dict(zip(sg.outputs, out, strict=False))
        assert np.array_equal(out[-1].reshape(-1), full[i])
    # Exit branches are separate graphs fed by the cut tensor.
    assert all(sg.exit_model is not None for sg in stages[:-1])
    assert stages[-1].exit_model is None


def test_residual_cut_across_skip_is_refused() -> None:
    from tests.optimize_models import residual_model

    model = residual_model()
    inner = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][1]
    with pytest.raises(ModelError, match="bypasses it"):
        split_stages(model, [inner])


# --- bad input ------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _conv_model(out_shape: list[int], op: str = "Conv") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    node = helper.make_node(op, ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_output_not_a_class_vector(tmp_path: Path, mnist_npz: Path, key: FleetKey) -> None:
    model = _save(_conv_model([1, 4, 64, 64]), tmp_path / "seg.onnx")
    with pytest.raises(ModelError, match=r"expected a class vector"):
        optimize(model, mnist_npz, tmp_path / "out", SPEC, key, OptimizeOptions(**FAST))
    assert not (tmp_path / "out").exists()


def test_unsupported_op(tmp_path: Path, mnist_npz: Path, key: FleetKey) -> None:
    model = _save(_conv_model([1, 4, 64, 64], op="FancyConv"), tmp_path / "odd.onnx")
    with pytest.raises(
        ModelError, match=r"uses op 'FancyConv', which ONNX opset 17 does not define"
    ):
        optimize(model, mnist_npz, tmp_path / "out", SPEC, key, OptimizeOptions(**FAST))


def test_not_an_onnx_file(tmp_path: Path, mnist_npz: Path, key: FleetKey) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf at all" * 10)
    with pytest.raises(ModelError, match=r"junk\.onnx: not an ONNX model"):
        optimize(tmp_path / "junk.onnx", mnist_npz, tmp_path / "out", SPEC, key, OptimizeOptions())


def test_labels_do_not_match_outputs(tmp_path: Path, key: FleetKey) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "three.npz"
    np.savez(
        data,
        images=rng.integers(0, 255, (60, 28, 28), dtype=np.uint8),
        labels=np.repeat(["a", "b", "c"], 20),
    )
    with pytest.raises(ModelError, match=r"outputs 10 classes but the data has 3 labels"):
        optimize(MODEL_PATH, data, tmp_path / "out", SPEC, key, OptimizeOptions(**FAST))


def test_unreadable_image(tmp_path: Path, key: FleetKey) -> None:
    root = tmp_path / "imgs"
    for label in "0123456789":
        (root / label).mkdir(parents=True)
        cv2.imwrite(str(root / label / "a.png"), np.zeros((28, 28), np.uint8))
    (root / "7" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"7/broken\.png: cannot read image"):
        optimize(MODEL_PATH, root, tmp_path / "out", SPEC, key, OptimizeOptions(**FAST))


def test_existing_output_directory(tmp_path: Path, mnist_npz: Path, key: FleetKey) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="output directory exists"):
        optimize(MODEL_PATH, mnist_npz, tmp_path / "out", SPEC, key, OptimizeOptions(**FAST))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_dynamic_quantization_refused_for_a_cnn(
    tmp_path: Path, mnist_npz: Path, key: FleetKey
) -> None:
    opts = OptimizeOptions(quantization="dynamic", **FAST)
    with pytest.raises(ModelError, match=r"dynamic quantization refused: only \d+% of MACs"):
        optimize(MODEL_PATH, mnist_npz, tmp_path / "out", SPEC, key, opts)
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_int8_that_collapses_is_refused_with_numbers(tmp_path: Path, key: FleetKey) -> None:
    """Activations that 8 bits cannot hold: a huge offset added, then removed again."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 1, (10, 64)).astype(np.float32), "w")
    big = numpy_helper.from_array(np.full((1, 1, 8, 8), 1e5, np.float32), "big")
    nodes = [
        helper.make_node("Add", ["x", "big"], ["shifted"], name="shift"),
        helper.make_node("Sub", ["shifted", "big"], ["back"], name="unshift"),
        helper.make_node("Flatten", ["back"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1, name="classifier"),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [w, big],
    )
    model = _save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    images = rng.integers(0, 256, (2400, 8, 8), dtype=np.uint8)  # 360 for validation
    spec = Preprocessing(height=8, width=8, color="GRAY", mean=[0.5], std=[0.25])
    x = Preprocessor(spec).batch(list(images))
    labels = logits_of(onnx.load(model), x).argmax(-1)  # fp32 is right by construction
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    opts = OptimizeOptions(max_drop=0.01, exits="none", labels=[str(i) for i in range(10)], **FAST)
    # The collapse guard stops it on the first all-INT8 attempt, with the numbers: no fp32
    # fallback of weights could repair activations that 8 bits cannot hold.
    with pytest.raises(
        QuantizationCollapse,
        match=r"INT8 outputs collapsed against fp32 on 360 validation samples: top-1 agreement",
    ):
        optimize(model, tmp_path / "d.npz", tmp_path / "out", spec, key, opts)
    assert not (tmp_path / "out").exists()


def test_too_few_validation_images_to_certify_the_budget(
    tmp_path: Path, mnist_npz: Path, key: FleetKey
) -> None:
    # 200 validation images cannot bound a drop below 1 pt at 90% even with none lost
    # (the bound is then 1 - 0.05 ** (1 / 200) = 1.49 pt): refused at once, with the remedy.
    arrays = dict(np.load(mnist_npz))
    arrays["validation_images"] = arrays["validation_images"][:200]
    arrays["validation_labels"] = arrays["validation_labels"][:200]
    np.savez(tmp_path / "small.npz", **arrays)
    with pytest.raises(BudgetError, match=r"validation split has 200 images.*at least 299"):
        optimize(
            MODEL_PATH, tmp_path / "small.npz", tmp_path / "out", SPEC, key, OptimizeOptions(**FAST)
        )
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.server.cli",
            "optimize",
            str(MODEL_PATH),
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
            "--keys-dir",
            str(tmp_path / "k"),
            "--size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert (
        "edgefleet optimize: error:" in res.stderr
        and "missing: no such file or folder" in res.stderr
    )
    assert "Traceback" not in res.stderr


def test_default_is_certified_and_the_bound_is_reported(reference_run: Path) -> None:
    report = json.loads((reference_run / "report.json").read_text())
    budget = report["budget"]
    assert budget["confidence"] == 0.9
    bound = budget["default_bound"]
    assert bound["drop_upper"] <= budget["max_drop"]
    assert bound["drop_upper"] > bound["drop"]  # a bound, not the measurement
    cert = report["exits"]["certification"]
    assert cert["certified"] >= 1 and cert["sequence"].startswith("one threshold")
    assert len(cert["points"]) == len(report["exits"]["operating_points"])
    default = report["exits"]["default"]
    assert cert["points"][default]["drop_upper"] == pytest.approx(bound["drop_upper"])


def test_manifest_metrics_hold_the_test_figures(reference_run: Path, key: FleetKey) -> None:
    manifest = verify_bundle(reference_run / "bundle", [key.public]).manifest
    report = json.loads((reference_run / "report.json").read_text())
    assert manifest.metrics.accuracy == report["test"]["accuracy"]
    assert manifest.metrics.exit_rates == report["test"]["exit_rates"]
    assert set(manifest.metrics.latency_ms) == set(report["latency_ms"])
    assert manifest.metrics.extra["test_fp32_accuracy"] == report["test"]["fp32_accuracy"]


def test_manifest_figures_are_what_the_device_computes(reference_run: Path, key: FleetKey) -> None:
    from edgefleet.server.optimize.figures import check_manifest_figures

    verified = verify_bundle(reference_run / "bundle", [key.public])
    images, labels = load_reference_split()["validation"]
    x = np.asarray(Preprocessor(SPEC).batch(list(images)), dtype=np.float32)
    check_manifest_figures(verified, x, labels)  # the frame-by-frame agent agrees exactly
    wrong = np.roll(labels, 1)
    with pytest.raises(ModelError, match="the device computes"):
        check_manifest_figures(verified, x, wrong)


def test_speed_controls_model_is_dropped_when_it_does_not_split(
    tmp_path: Path, mnist_npz: Path, key: FleetKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Speed control's faster model must split bit-identically like any other, or the
    accuracy-controlled model ships instead (timing decides which nodes stay fp32, so the
    unsplittable case is staged here: a fixed fp32 node and a failing first split check)."""
    import edgefleet.server.optimize.pipeline as pipeline

    def fake_speed(
        fp32: onnx.ModelProto, name: str, cal: np.ndarray, excluded: list[str], **kw: object
    ) -> tuple[onnx.ModelProto, dict[str, object]]:
        node = "/stem/conv/Conv"
        q = quantize_qdq(fp32, name, cal[:50], exclude=[*excluded, node], reduce_range=True)
        return q, {"speed_excluded": [node], "excluded": [*excluded, node], "passes": []}

    real_check = pipeline._check_split_identical
    calls: list[int] = []

    def first_fails(*args: object) -> bool:
        calls.append(1)
        return False if len(calls) == 1 else real_check(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "speed_fallback", fake_speed)
    monkeypatch.setattr(pipeline, "_check_split_identical", first_fails)
    report = optimize(
        MODEL_PATH,
        mnist_npz,
        tmp_path / "out",
        SPEC,
        key,
        OptimizeOptions(**FAST),
        progress=lambda _m: None,
    )
    assert len(calls) == 2
    assert report["quantization"]["speed"]["kept"] is False
    assert "/stem/conv/Conv" not in report["quantization"]["excluded"]
    assert report["bundle"]["split_identical"] is True
    verify_bundle(tmp_path / "out" / "bundle", [key.public])
