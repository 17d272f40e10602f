"""A tiny hand-made detector bundle and a video of a bright square, for the agent's detect path.

The model cuts its 32x32 grey input into a 4x4 grid of 8x8 cells; each cell is one yolov8
candidate (attributes_first, (1, 5, 16)) whose box is the cell and whose score is the
cell's mean brightness. A white square covering a cell is one box, score about 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.bundle import (
    ManifestBody,
    OperatingPoint,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
    write_bundle,
)
from edgefleet.agent.bundle.manifest import Detection, Gate
from edgefleet.server.keystore import FleetKey, init_key

SIDE, CELL = 32, 8
GRID = SIDE // CELL
FRAME = 64  # video frames are 64x64: the frame -> input scale is 1/2


def cell_model() -> bytes:
    """image (1,1,32,32) -> boxes (1,5,16): cell boxes (cx, cy, w, h) and mean brightness."""
    centres = [(c * CELL + CELL / 2, r * CELL + CELL / 2) for r in range(GRID) for c in range(GRID)]
    boxes = np.array(
        [[x for x, _ in centres], [y for _, y in centres], [CELL] * 16, [CELL] * 16], np.float32
    ).reshape(1, 4, GRID * GRID)
    nodes = [
        helper.make_node(
            "AveragePool", ["image"], ["pooled"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]
        ),
        helper.make_node("Reshape", ["pooled", "shape"], ["score"]),
        helper.make_node("Concat", ["cells", "score"], ["boxes"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cells",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, SIDE, SIDE])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 5, GRID * GRID])],
        [
            numpy_helper.from_array(boxes, "cells"),
            numpy_helper.from_array(np.array([1, 1, GRID * GRID], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def detect_body(
    *, layout: str = "attributes_first", gate: Gate | None = None, version: int = 1
) -> ManifestBody:
    """The cell detector's manifest: one stage, no exits, one label "square"."""
    points = [OperatingPoint(name="every-frame", thresholds=[])]
    if gate is not None:
        points.append(OperatingPoint(name="gated", thresholds=[], gate=gate))
    return ManifestBody(
        model_id="cells-det",
        version=version,
        created_ts=time.time(),
        input=TensorSpec(name="image", shape=[1, 1, SIDE, SIDE]),
        preprocessing=Preprocessing(
            height=SIDE, width=SIDE, resize="letterbox", color="GRAY", mean=[0.0], std=[1.0]
        ),
        task="detect",
        detection=Detection(
            decoder="yolov8",
            outputs=["boxes"],
            layout=layout,
            score_threshold=0.5,  # type: ignore[arg-type]
        ),
        labels=["square"],
        stages=[Stage(file="model.onnx", inputs=["image"], outputs=[])],
        operating_points=points,
        provenance=Provenance(source_model_sha256="0" * 64),
    )


def detect_bundle(root: Path, **changes: object) -> tuple[Path, FleetKey]:
    """A signed cell-detector bundle under root, and its key."""
    key, _ = init_key(root / "keys")
    out = root / "det-bundle"
    write_bundle(out, detect_body(**changes), {"model.onnx": cell_model()}, key.private)  # type: ignore[arg-type]
    return out, key


def frame_with_square(cell: tuple[int, int] | None) -> np.ndarray:
    """A black 64x64 BGR frame, with a white square over grid cell (row, col) when given."""
    img = np.zeros((FRAME, FRAME, 3), np.uint8)
    if cell is not None:
        r, c = cell
        s = CELL * FRAME // SIDE
        img[r * s : (r + 1) * s, c * s : (c + 1) * s] = 255
    return img


# Frames of one pass of the test video: empty, a square at cell (1, 2), empty.
EMPTY_BEFORE, SQUARE_FRAMES, EMPTY_AFTER = 10, 30, 30


def square_video(path: Path) -> Path:
    """An MJPG video: EMPTY_BEFORE black frames, the square for SQUARE_FRAMES, then black."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (FRAME, FRAME))
    assert writer.isOpened()
    for i in range(EMPTY_BEFORE + SQUARE_FRAMES + EMPTY_AFTER):
        on = EMPTY_BEFORE <= i < EMPTY_BEFORE + SQUARE_FRAMES
        writer.write(frame_with_square((1, 2) if on else None))
    writer.release()
    return path
