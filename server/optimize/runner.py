"""Run an in-memory ONNX model over a data set with onnxruntime (batch 1, as devices run)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from edgefleet.agent.runtime.session import session_options

F32 = npt.NDArray[np.float32]


def make_session(model: onnx.ModelProto | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with the device's session options."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])


def run_outputs(
    model: onnx.ModelProto | ort.InferenceSession,
    x: F32,
    outputs: Sequence[str] | None = None,
) -> list[npt.NDArray[np.generic]]:
    """Run every sample of x (N, ...) alone and stack each requested output over N."""
    sess = model if isinstance(model, ort.InferenceSession) else make_session(model)
    name = sess.get_inputs()[0].name
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    per_output: list[list[npt.NDArray[np.generic]]] = [[] for _ in names]
    for i in range(x.shape[0]):
        for store, value in zip(per_output, sess.run(names, {name: x[i : i + 1]}), strict=True):
            store.append(np.asarray(value))
    return [np.concatenate(v, axis=0) for v in per_output]


def logits_of(model: onnx.ModelProto | ort.InferenceSession, x: F32) -> F32:
    """Class scores (N, C) of a single-output classifier."""
    (out,) = run_outputs(model, x)[:1]
    return np.asarray(out, dtype=np.float32).reshape(x.shape[0], -1)


def accuracy(logits: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Top-1 accuracy."""
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)))
