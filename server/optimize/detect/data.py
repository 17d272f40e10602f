"""Detection data for the optimizer: the .npz of the detection contract, checked once.

Keys: `<split>_images` (N, H, W) or (N, H, W, 3) uint8 (BGR unless `color` says RGB) for
calibration, validation and test (train is ignored); `<split>_boxes` (M, 6) float32 rows
[image_index, class, x1, y1, x2, y2] in that image's pixels; optional `labels` (C,) str.
Without `validation_boxes` the data is *unlabelled*: the optimizer then measures INT8 against
the fp32 model's own detections (a third-party model whose classes our data does not name).
Every refusal names the file, the split, the row and the value at fault.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.detect.boxes import Detections

from ..data import _frames, _npz_color
from ..errors import DataError

Frame = npt.NDArray[Any]
SPLITS = ("calibration", "validation", "test")
# Box corners may sit a hair outside the image from float rounding (a box computed in
# another resolution and scaled); anything further out is a wrong coordinate system.
EDGE_TOLERANCE = 0.5


@dataclass
class DetectionData:
    """Frames per split, their ground truth (None where unlabelled), and the label names."""

    images: dict[str, list[Frame]]
    truth: dict[str, list[Detections] | None]
    names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        """True when validation has ground-truth boxes (the budget is on true mAP)."""
        return self.truth.get("validation") is not None

    def sizes(self) -> dict[str, int]:
        """Frames per split."""
        return {k: len(v) for k, v in self.images.items()}

    def boxes(self) -> dict[str, int | None]:
        """Ground-truth boxes per split (None: unlabelled)."""
        return {k: None if v is None else sum(len(d) for d in v) for k, v in self.truth.items()}


def _names(path: Path, arrays: Any, given: list[str] | None, classes: int) -> list[str]:
    """Label names: --labels, else the file's `labels`, else "0".."C-1"; must fit the model."""
    stored: list[str] | None = None
    if "labels" in arrays:
        raw = np.asarray(arrays["labels"])
        if raw.ndim != 1 or raw.dtype.kind not in "US":
            raise DataError(f"{path}: 'labels' must be a 1-D array of strings, got {raw.dtype}")
        stored = [str(v) for v in raw.tolist()]
    if given is not None and stored is not None and given != stored:
        raise DataError(
            f"{path}: --labels {given[:10]} differ from the file's labels {stored[:10]}"
        )
    names = given if given is not None else stored
    if names is None:
        return [str(i) for i in range(classes)]
    source = "--labels" if given is not None else f"{path}: 'labels'"
    if len(names) != classes:
        raise DataError(
            f"{source} has {len(names)} label(s) {names[:10]} but the model outputs "
            f"{classes} class(es)"
        )
    if len(set(names)) != len(names):
        raise DataError(f"{source}: label names repeat: {names[:10]}")
    return names


def _truth(
    path: Path, split: str, frames: list[Frame], rows: npt.NDArray[Any], classes: int
) -> list[Detections]:
    """Per-frame ground truth from (M, 6) rows, refusing any row that cannot be right."""
    key = f"{split}_boxes"
    if rows.ndim != 2 or rows.shape[1] != 6:
        raise DataError(
            f"{path}: {key!r} has shape {rows.shape}; expected (M, 6) rows "
            "[image_index, class, x1, y1, x2, y2]"
        )
    if rows.dtype.kind not in "fiu" or not np.isfinite(rows.astype(np.float64)).all():
        raise DataError(f"{path}: {key!r} must hold finite numbers")
    r = rows.astype(np.float64)
    for j, row in enumerate(r):
        idx, cls, x1, y1, x2, y2 = row.tolist()
        where = f"{path}: {key!r} row {j}"
        if idx != round(idx) or not 0 <= idx < len(frames):
            raise DataError(f"{where}: image index {idx:g} outside 0..{len(frames) - 1}")
        if cls != round(cls) or not 0 <= cls < classes:
            raise DataError(
                f"{where}: class id {cls:g} is not below the label count {classes} "
                f"(ids are 0..{classes - 1})"
            )
        h, w = frames[int(idx)].shape[:2]
        t = EDGE_TOLERANCE
        if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
            raise DataError(
                f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside image {int(idx)} "
                f"of {w}x{h} pixels (boxes are x1, y1, x2, y2 in the image's pixels)"
            )
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty")
    per: list[Detections] = []
    image = r[:, 0].astype(np.int64)
    for i, frame in enumerate(frames):
        mine = r[image == i]
        h, w = frame.shape[:2]
        boxes = np.clip(mine[:, 2:6], 0, [w, h, w, h])
        per.append(Detections.of(boxes, np.ones(len(mine)), mine[:, 1]))
    return per


def load_detection(path: Path, classes: int, labels: list[str] | None = None) -> DetectionData:
    """Read and check a detection .npz for a model of `classes` classes."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix != ".npz" or not zipfile.is_zipfile(path):
        raise DataError(f"{path}: expected a detection .npz (written with np.savez)")
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [f"{s}_images" for s in SPLITS if f"{s}_images" not in keys]
    if missing:
        raise DataError(
            f"{path}: missing {missing}; a detection .npz has <split>_images for "
            f"{', '.join(SPLITS)} (and <split>_boxes rows [image_index, class, x1, y1, x2, y2])"
        )
    names = _names(path, arrays, labels, classes)
    color = _npz_color(path, arrays)
    images: dict[str, list[Frame]] = {}
    truth: dict[str, list[Detections] | None] = {}
    labelled = "validation_boxes" in keys
    for split in SPLITS:
        frames = _frames(path, f"{split}_images", np.asarray(arrays[f"{split}_images"]), color)
        if not frames:
            raise DataError(f"{path}: split {split!r} has no images")
        images[split] = frames
        key = f"{split}_boxes"
        if split == "calibration" or not labelled:
            truth[split] = None  # calibration needs images only; unlabelled: fp32 is the truth
            continue
        if key not in keys:
            raise DataError(
                f"{path}: validation has boxes but {split} has no {key!r}; give both or neither"
            )
        truth[split] = _truth(path, split, frames, np.asarray(arrays[key]), len(names))
    val = truth["validation"]
    if val is not None:
        counts = np.bincount(
            np.concatenate([d.classes for d in val]).astype(np.int64), minlength=len(names)
        )
        empty = [names[c] for c in range(len(names)) if counts[c] == 0]
        if empty:
            raise DataError(
                f"{path}: validation has no box of class(es) {empty[:10]}: their AP, and so "
                "the mAP the budget is measured on, is undefined; add such images, or name "
                "only the classes the model outputs and the data holds"
            )
    provenance = {"source": str(path), "labelled": labelled}
    return DetectionData(images, truth, names, provenance)
