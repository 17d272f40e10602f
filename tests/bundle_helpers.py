"""Small real ONNX stage models and bundle bodies for bundle and runtime tests."""

from __future__ import annotations

import io
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.bundle import (
    ExitHead,
    ManifestBody,
    OperatingPoint,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
)

SOURCE_SHA = "0" * 64


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def stage0_model(rng: np.random.Generator) -> bytes:
    """image (N,1,8,8) -> conv+relu features f1 (N,4,8,8) and pooled exit features e0 (N,4)."""
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w0")
    nodes = [
        helper.make_node("Conv", ["image", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["f1"]),
        helper.make_node("GlobalAveragePool", ["f1"], ["g0"]),
        helper.make_node("Flatten", ["g0"], ["e0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "stage0",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [
            helper.make_tensor_value_info("f1", TensorProto.FLOAT, ["N", 4, 8, 8]),
            helper.make_tensor_value_info("e0", TensorProto.FLOAT, ["N", 4]),
        ],
        [w],
    )
    return _model(graph)


def stage1_model(rng: np.random.Generator, classes: int = 3) -> bytes:
    """f1 (N,4,8,8) -> logits (1,classes) through pooling and a linear layer."""
    w = numpy_helper.from_array(rng.standard_normal((classes, 4)).astype(np.float32), "w1")
    b = numpy_helper.from_array(np.zeros(classes, np.float32), "b1")
    nodes = [
        helper.make_node("GlobalAveragePool", ["f1"], ["g1"]),
        helper.make_node("Flatten", ["g1"], ["p1"]),
        helper.make_node("Gemm", ["p1", "w1", "b1"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "stage1",
        [helper.make_tensor_value_info("f1", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [w, b],
    )
    return _model(graph)


def head_npz(rng: np.random.Generator, classes: int = 3) -> bytes:
    """Exit head weights (classes, 4) and bias, as the agent reads them."""
    buf = io.BytesIO()
    np.savez(
        buf,
        weight=rng.standard_normal((classes, 4)).astype(np.float32),
        bias=np.zeros(classes, np.float32),
    )
    return buf.getvalue()


PREPROCESSING = Preprocessing(height=8, width=8, color="GRAY", mean=[0.5], std=[0.25])
LABELS = ["cat", "dog", "bird"]


def two_stage_body(**changes: object) -> ManifestBody:
    """A two-stage early-exit manifest body; keyword arguments override fields."""
    fields: dict[str, object] = {
        "model_id": "tiny-cnn",
        "version": 3,
        "created_ts": time.time(),
        "input": TensorSpec(name="image", shape=[1, 1, 8, 8]),
        "preprocessing": PREPROCESSING,
        "labels": LABELS,
        "stages": [
            Stage(
                file="stage0.onnx",
                inputs=["image"],
                outputs=["f1"],
                exit=ExitHead(output="e0", kind="features", head_file="heads/exit0.npz"),
                macs=2304,
            ),
            Stage(
                file="stage1.onnx",
                inputs=["f1"],
                exit=ExitHead(output="logits", kind="logits"),
                macs=268,
            ),
        ],
        "operating_points": [
            OperatingPoint(name="accurate", thresholds=[0.95], val_accuracy=0.9),
            OperatingPoint(name="fast", thresholds=[0.6], val_accuracy=0.85),
        ],
        "provenance": Provenance(source_model_sha256=SOURCE_SHA, optimizer={"int8": True}),
    }
    fields.update(changes)
    return ManifestBody.model_validate(fields)


def two_stage_files(seed: int = 0) -> dict[str, bytes]:
    """The files two_stage_body() references."""
    rng = np.random.default_rng(seed)
    return {
        "stage0.onnx": stage0_model(rng),
        "stage1.onnx": stage1_model(rng),
        "heads/exit0.npz": head_npz(rng),
    }


def one_stage_body() -> ManifestBody:
    """A plain model: one stage, no early exits, no operating points."""
    return ManifestBody(
        model_id="plain",
        version=1,
        created_ts=time.time(),
        input=TensorSpec(name="f1", shape=[1, 4, 8, 8]),
        preprocessing=Preprocessing(height=8, width=8, color="RGB", mean=[0, 0, 0], std=[1, 1, 1]),
        labels=LABELS,
        stages=[
            Stage(file="model.onnx", inputs=["f1"], exit=ExitHead(output="logits", kind="logits"))
        ],
        provenance=Provenance(source_model_sha256=SOURCE_SHA),
    )
