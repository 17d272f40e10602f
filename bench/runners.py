"""Contenders the benchmarks time: onnxruntime as a device runs it, and OpenCV's DNN as a peer.

A runner takes one batch-1 input and returns whatever the engine returns; the interleaved
timer in edgefleet.server.optimize.latency runs them side by side.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnx

from edgefleet.server.optimize.latency import Runner
from edgefleet.server.optimize.runner import make_session

F32 = npt.NDArray[np.float32]


def model_runner(model: onnx.ModelProto | bytes, threads: int) -> Runner:
    """A device-configured onnxruntime session on an in-memory model, as a runner."""
    sess = make_session(model, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def ort_runner(path: Path, threads: int) -> Runner:
    """A device-configured onnxruntime session on one model file, as a runner."""
    return model_runner(path.read_bytes(), threads)


# OpenCV's own ONNX engines by the names each release gives them: 5.0 has CLASSIC and NEW,
# 5.1 dropped CLASSIC and calls its engine OPENCV; 4.x has no engine argument. ENGINE_AUTO and
# 5.1's ENGINE_ORT may run the model through onnxruntime, which is no peer of onnxruntime.
_CV2_OWN_ENGINES = ("ENGINE_OPENCV", "ENGINE_NEW", "ENGINE_CLASSIC")


def cv2_engines() -> dict[str, int | None]:
    """OpenCV's own DNN engines in the installed OpenCV, by contender name."""
    found = {
        f"fp32_cv2dnn_{name.removeprefix('ENGINE_').lower()}": int(getattr(cv2.dnn, name))
        for name in _CV2_OWN_ENGINES
        if hasattr(cv2.dnn, name)
    }
    return dict(found) if found else {"fp32_cv2dnn": None}


def cv2_runner(path: Path, threads: int, engine: int | None = None) -> Runner:
    """OpenCV's DNN module on the same fp32 model, its own CPU backend."""
    cv2.setNumThreads(threads)  # process-wide; set before every measurement that uses it
    net = (
        cv2.dnn.readNetFromONNX(str(path))
        if engine is None
        else cv2.dnn.readNetFromONNX(str(path), engine)
    )
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

    def run(x: F32) -> object:
        net.setInput(x)
        return net.forward()

    return run
