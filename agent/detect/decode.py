"""A detector's raw outputs -> boxes in input-tensor pixels, as the manifest declares them.

The bundle says which decoder reads which output (manifest `Detection`); nothing is guessed
from shapes, and an output that does not fit the declaration is a `DecodeError` naming the
tensor, its shape and what was expected. Runs once per frame on a Raspberry Pi, so every
step is a vectorised numpy operation and only the boxes that pass their threshold are
decoded at all.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle.manifest import Detection

from .boxes import Detections, xywh_to_xyxy

# Candidates that enter NMS at most, best first (Ultralytics' max_nms): an untrained or
# broken model that scores every anchor high must not make NMS quadratic on a Pi.
MAX_NMS = 30_000


class DecodeError(ValueError):
    """A detector output that does not match what the bundle declares."""


def decode(
    outputs: Sequence[npt.NDArray[Any]],
    spec: Detection,
    labels: Sequence[str],
    input_hw: tuple[int, int],
    *,
    score_threshold: float | None = None,
    thresholds: Mapping[int, float] | None = None,
) -> Detections:
    """Boxes (xyxy, input-tensor pixels) after per-class thresholds and NMS, best first.

    `outputs` are the arrays of `spec.outputs`, in that order. `score_threshold` and
    `thresholds` (class index -> threshold) are the agent's own overrides; see
    `score_thresholds` for which threshold wins.
    """
    if len(outputs) != 1 or len(spec.outputs) != 1:
        raise DecodeError(
            f"decoder {spec.decoder} reads exactly one output; the bundle declares "
            f"{spec.outputs} and {len(outputs)} array(s) were given"
        )
    thr = score_thresholds(spec, labels, score_threshold=score_threshold, thresholds=thresholds)
    name, raw = spec.outputs[0], np.asarray(outputs[0])
    if spec.decoder == "yolov8":
        cand = _yolov8(raw, name, spec.layout, thr)
    else:
        cand = _yolox(raw, name, spec.strides, input_hw, thr)
    return nms(cand, spec.nms_iou, spec.max_detections, class_agnostic=spec.class_agnostic)


def score_thresholds(
    spec: Detection,
    labels: Sequence[str],
    *,
    score_threshold: float | None = None,
    thresholds: Mapping[int, float] | None = None,
) -> npt.NDArray[np.float32]:
    """(C,) threshold per class: a box is kept when its score >= its class's threshold.

    Most specific and most local wins: the agent's per-class `thresholds`, then the agent's
    `score_threshold`, then the manifest's `class_thresholds` (by label), then its
    `score_threshold`. An operator who sets a threshold on a device means it for that device.
    """
    if not labels:
        raise DecodeError("a detector needs at least one label")
    index = {label: i for i, label in enumerate(labels)}
    thr = np.full(len(labels), spec.score_threshold, np.float32)
    for label, t in spec.class_thresholds.items():
        if label not in index:
            raise DecodeError(
                f"class_thresholds names label {label!r}, "
                f"which is not among the labels {list(labels)}"
            )
        thr[index[label]] = t
    if score_threshold is not None:
        thr[:] = _check_threshold(score_threshold, "score_threshold")
    for i, t in (thresholds or {}).items():
        if not 0 <= i < len(labels):
            raise DecodeError(f"threshold for class {i}: there are {len(labels)} classes")
        thr[i] = _check_threshold(t, f"threshold for class {i}")
    return thr


def _check_threshold(t: float, what: str) -> float:
    # OpenCV's NMS drops scores <= 0 whatever it is told, so 0 could not mean "keep all".
    if not 0.0 < t <= 1.0:
        raise DecodeError(f"{what} = {t} outside (0, 1]")
    return float(t)


def nms(
    dets: Detections, iou: float, max_detections: int, *, class_agnostic: bool = False
) -> Detections:
    """Non-maximum suppression (OpenCV's): a box is dropped when its IoU with a better box
    of its class (any class when class_agnostic) is above `iou`; best first, at most
    `max_detections`."""
    if len(dets) == 0:
        return dets
    order = np.argsort(-dets.scores, kind="stable")[:MAX_NMS]
    dets = dets.take(order)
    boxes = dets.boxes.astype(np.float64)
    if not class_agnostic and len(dets) > 1:
        # Batched NMS by offset: each class moves to its own region, so boxes of different
        # classes never overlap. OpenCV's NMSBoxesBatched offsets by class * (max + 1), which
        # lets a box with negative coordinates (partly outside the input) reach into the
        # previous class's region; offsetting from the minimum as well cannot.
        lo, hi = float(boxes.min()), float(boxes.max())
        boxes = boxes - lo + dets.classes[:, None].astype(np.float64) * (hi - lo + 1.0)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    # Scores were thresholded already (all > 0); OpenCV keeps scores > its threshold.
    # (OpenCV's stubs say sequences; it takes the arrays as they are.)
    kept = cv2.dnn.NMSBoxes(cast(Any, xywh), cast(Any, dets.scores), 0.0, float(iou))
    # Returned as (K,), (K, 1) or an empty tuple depending on the OpenCV version.
    idx = np.sort(np.asarray(kept, np.intp).reshape(-1))[:max_detections]
    return dets.take(idx)


def _shape_error(name: str, raw: npt.NDArray[Any], decoder: str, expected: str) -> DecodeError:
    return DecodeError(
        f"output {name!r} has shape {tuple(raw.shape)}; decoder {decoder} expects {expected}"
    )


def _candidates(
    boxes_xyxy: npt.NDArray[np.float32],
    scores: npt.NDArray[Any],
    classes: npt.NDArray[Any],
) -> Detections:
    # A box with a non-finite or empty extent is a broken output, not an object.
    ok = np.isfinite(boxes_xyxy).all(axis=1)
    ok &= (boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1])
    return Detections(
        np.ascontiguousarray(boxes_xyxy[ok]),
        scores[ok].astype(np.float32),
        classes[ok].astype(np.int64),
    )


def _yolov8(
    raw: npt.NDArray[Any], name: str, layout: str, thr: npt.NDArray[np.float32]
) -> Detections:
    c = len(thr)
    axis = 1 if layout == "attributes_first" else 2
    if raw.ndim != 3 or raw.shape[0] != 1 or raw.shape[axis] != 4 + c:
        expected = "(1, 4 + C, N)" if axis == 1 else "(1, N, 4 + C)"
        raise _shape_error(
            name, raw, f"yolov8 ({layout})", f"{expected} with C = {c} labels, 4 + C = {4 + c}"
        )
    # (4 + C, N) either way: a transposed view, no copy of the whole output.
    pred = raw[0] if axis == 1 else raw[0].T
    scores = pred[4:]
    cls = scores.argmax(axis=0)
    best = np.take_along_axis(scores, cls[None, :], axis=0)[0]
    keep = np.flatnonzero(best >= thr[cls])  # NaN scores compare False: dropped
    boxes = xywh_to_xyxy(pred[:4, keep].T)
    return _candidates(boxes, best[keep], cls[keep])


@functools.lru_cache(maxsize=8)
def yolox_grid(
    input_hw: tuple[int, int], strides: tuple[int, ...]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(N, 2) cell x, y and (N,) stride of every YOLOX row: per stride, its grid row-major.

    A grid has ceil(H / s) x ceil(W / s) cells, which is what stride-2 convolutions with
    padding 1 give for sizes that are not multiples of s (and H / s x W / s for those that are).
    """
    h, w = input_hw
    grids, steps = [], []
    for s in strides:
        gh, gw = -(-h // s), -(-w // s)
        yv, xv = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([xv.reshape(-1), yv.reshape(-1)], axis=1))
        steps.append(np.full(gh * gw, s))
    grid = np.concatenate(grids).astype(np.float32)
    stride = np.concatenate(steps).astype(np.float32)
    grid.setflags(write=False)
    stride.setflags(write=False)
    return grid, stride


def _yolox(
    raw: npt.NDArray[Any],
    name: str,
    strides: Sequence[int],
    input_hw: tuple[int, int],
    thr: npt.NDArray[np.float32],
) -> Detections:
    c = len(thr)
    if raw.ndim != 3 or raw.shape[0] != 1 or raw.shape[2] != 5 + c:
        expected = f"(1, N, 5 + C) with C = {c} labels, 5 + C = {5 + c}"
        raise _shape_error(name, raw, "yolox", expected)
    grid, stride = yolox_grid((int(input_hw[0]), int(input_hw[1])), tuple(strides))
    if raw.shape[1] != len(grid):
        raise _shape_error(
            name,
            raw,
            "yolox",
            f"N = {len(grid)} rows: the grids of strides {list(strides)} over a "
            f"{input_hw[0]}x{input_hw[1]} input",
        )
    pred = raw[0]
    # Class scores are at most 1, so a row whose objectness is below every threshold
    # cannot pass: only the others are looked at.
    rows = np.flatnonzero(pred[:, 4] >= thr.min())
    sub = pred[rows]
    cls = sub[:, 5:].argmax(axis=1)
    score = sub[:, 4] * np.take_along_axis(sub[:, 5:], cls[:, None], axis=1)[:, 0]
    keep = score >= thr[cls]
    rows, sub, cls, score = rows[keep], sub[keep].astype(np.float32), cls[keep], score[keep]
    s = stride[rows, None]
    with np.errstate(over="ignore"):  # exp of a garbage log-size: inf, dropped as non-finite
        cxcywh = np.concatenate([(sub[:, :2] + grid[rows]) * s, np.exp(sub[:, 2:4]) * s], axis=1)
    return _candidates(xywh_to_xyxy(cxcywh), score, cls)
