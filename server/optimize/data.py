"""Labelled images for the optimizer: a split/label/image folder tree or an .npz of splits.

Images are kept as the camera would deliver them (uint8, BGR or grey, any size) and go through
the agent's own preprocessing, so calibration sees exactly what devices will compute.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import Preprocessing
from edgefleet.server.datasets.splits import stratified_split

from .errors import DataError

SPLITS = ("train", "calibration", "validation", "test")
_ALIASES = {
    "train": "train",
    "training": "train",
    "calibration": "calibration",
    "calib": "calibration",
    "cal": "calibration",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
    "testing": "test",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
# Fractions used when splits must be carved out of one labelled set (documented in the report).
CARVE_FRACTIONS = {"train": 0.6, "calibration": 0.1, "validation": 0.15, "test": 0.15}
CARVE_SEED = 0

Frame = npt.NDArray[Any]


@dataclass
class LabelledData:
    """Images per split with class indices, the label names, and how the splits were made."""

    images: dict[str, list[Frame]]
    labels: dict[str, npt.NDArray[np.int64]]
    names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Samples per split."""
        return {k: len(v) for k, v in self.images.items()}


def _natural_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _read_image(path: Path) -> Frame:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: cannot read image (not an image file, or corrupt)")
    if img.dtype != np.uint8:
        raise DataError(f"{path}: {img.dtype} pixels; only 8-bit images are supported")
    frame: Frame = img
    return frame


def _read_label_dirs(root: Path, names: list[str] | None) -> tuple[list[Frame], list[str]]:
    """Images under root/<label>/; returns frames and their label names."""
    frames: list[Frame] = []
    labels: list[str] = []
    label_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name)
    )
    if not label_dirs:
        raise DataError(f"{root}: no label folders (expected {root}/<label>/<image>)")
    for d in label_dirs:
        if names is not None and d.name not in names:
            raise DataError(f"{d}: label {d.name!r} is not among the model's labels {names}")
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files:
            frames.append(_read_image(p))
            labels.append(d.name)
    if not frames:
        raise DataError(f"{root}: no images found under its label folders")
    return frames, labels


def _from_folder(
    root: Path, names: list[str] | None
) -> tuple[dict[str, list[Frame]], dict[str, list[str]]]:
    subdirs = {d.name: d for d in root.iterdir() if d.is_dir()}
    split_dirs = {_ALIASES[n.lower()]: d for n, d in subdirs.items() if n.lower() in _ALIASES}
    if split_dirs and len(split_dirs) != len(subdirs):
        other = sorted(set(subdirs) - {d.name for d in split_dirs.values()})
        raise DataError(f"{root}: mixes split folders and other folders {other}")
    if not split_dirs:
        frames, labels = _read_label_dirs(root, names)
        return {"all": frames}, {"all": labels}
    images, labels_by = {}, {}
    for split, d in split_dirs.items():
        images[split], labels_by[split] = _read_label_dirs(d, names)
    return images, labels_by


# Key schemes of an .npz, tried in this order: (image key, label key) per split. `{s}` is a
# split name or alias; the unqualified form is one set that the splits are carved from.
NPZ_SCHEMES = (
    "<split>_images/<split>_labels",
    "x_<split>/y_<split> (X_<split>)",
    "<split>_x/<split>_y (<split>_X)",
    "images/labels",
    "x/y",
    "X/y",
    "data/target",
)
_IMAGE_KEY = [
    # (pattern of an image key, its label keys in order of preference)
    (re.compile(r"^(?P<split>[A-Za-z0-9]+)_images$"), ("{split}_labels",)),
    (re.compile(r"^[xX]_(?P<split>[A-Za-z0-9]+)$"), ("y_{split}", "Y_{split}")),
    (re.compile(r"^(?P<split>[A-Za-z0-9]+)_[xX]$"), ("{split}_y", "{split}_Y")),
    (re.compile(r"^images$"), ("labels",)),
    (re.compile(r"^[xX]$"), ("y", "Y")),
    (re.compile(r"^data$"), ("target",)),
]
# An optional 0-d string array in the .npz declaring the order of 3-channel images.
NPZ_COLOR_KEY = "color"


def _split_names() -> str:
    return ", ".join(
        "/".join([s, *sorted(a for a, t in _ALIASES.items() if t == s and a != s)]) for s in SPLITS
    )


def _npz_pairs(path: Path, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Split ("all" for an unqualified set) -> (image key, label key), or one error naming all."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in sorted(keys):
        for pattern, label_keys in _IMAGE_KEY:
            m = pattern.match(key)
            if m is None:
                continue
            prefix = m.groupdict().get("split")
            candidates = [lk.format(split=prefix or "") for lk in label_keys]
            label = next((lk for lk in candidates if lk in keys), None)
            known = prefix is None or prefix.lower() in _ALIASES
            if label is None and not known:
                break  # e.g. 'max_x' alone: another array of the file, not a split
            if label is None:
                want = " or ".join(map(repr, candidates))
                raise DataError(f"{path}: has images {key!r} but no labels {want}")
            if prefix is None:
                split = "all"
            elif known:
                split = _ALIASES[prefix.lower()]
            else:
                raise DataError(
                    f"{path}: {key!r} names unknown split {prefix!r}; use {_split_names()}"
                )
            if split in pairs:
                raise DataError(
                    f"{path}: split {split!r} is given twice, by {pairs[split][0]!r} and {key!r}"
                )
            pairs[split] = (key, label)
            break
    if not pairs:
        raise DataError(
            f"{path}: no image/label arrays among its keys {sorted(keys)}; accepted: "
            f"{', '.join(NPZ_SCHEMES)} (<split>: {_split_names()})"
        )
    return pairs


def _npz_color(path: Path, arrays: Mapping[str, Any]) -> str:
    """The declared order of 3-channel images: BGR (OpenCV's, the default) or RGB."""
    if NPZ_COLOR_KEY not in arrays:
        return "BGR"
    value = np.asarray(arrays[NPZ_COLOR_KEY])
    item = value.reshape(-1)[0].item() if value.size == 1 else None
    text = (item.decode(errors="replace") if isinstance(item, bytes) else str(item)).upper()
    if value.dtype.kind not in "US" or text not in ("RGB", "BGR"):
        raise DataError(
            f"{path}: {NPZ_COLOR_KEY!r} must be the string 'RGB' or 'BGR', got {value!r}"
        )
    return text


def _to_uint8(path: Path, key: str, x: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Pixel values as uint8: float in [0, 1] is scaled by 255, [0, 255] kept, then rounded."""
    if x.dtype == np.uint8:
        same: npt.NDArray[np.uint8] = x
        return same
    if x.size == 0:
        return x.astype(np.uint8)
    kind = x.dtype.kind
    if kind not in "fiu":
        raise DataError(f"{path}: {key!r} has {x.dtype} values; expected uint8, integer or float")
    if kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: {key!r} holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise DataError(
            f"{path}: {key!r} values range over [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]"
        )
    if kind == "f" and hi <= 1.0:
        # The whole array decides: a float set whose brightest pixel is <= 1 is [0, 1].
        x = x * 255.0
    out: npt.NDArray[np.uint8] = np.rint(x).astype(np.uint8)
    return out


def _frames(path: Path, key: str, x: npt.NDArray[Any], color: str) -> list[Frame]:
    """Any common layout -> the camera's form: (H, W) grey or (H, W, 3) BGR uint8 frames."""
    shape = tuple(x.shape)
    if x.ndim == 2 and x.shape[1] > 0 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]:
        side = math.isqrt(x.shape[1])  # flat grey squares, as scikit-learn's `data`
        x = x.reshape(len(x), side, side)
    elif x.ndim == 4:
        if x.shape[3] in (1, 3):
            pass  # channels last wins when both could be channels: (N, 3, H, 3) is NHWC
        elif x.shape[1] in (1, 3):
            x = x.transpose(0, 2, 3, 1)
        else:
            raise DataError(
                f"{path}: {key!r} has shape {shape}; neither the last nor the second dim is "
                "a channel count (1 or 3)"
            )
    elif x.ndim != 3:
        raise DataError(
            f"{path}: {key!r} has shape {shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) "
            "with C 1 or 3, or (N,D) flat squares"
        )
    x = _to_uint8(path, key, x)
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    elif x.ndim == 4 and color == "RGB":
        x = x[..., ::-1]
    # Contiguous copies: OpenCV refuses transposed or reversed views.
    return [np.ascontiguousarray(f) for f in x]


def _labels(path: Path, key: str, y: npt.NDArray[Any]) -> list[str]:
    """Class labels as text: 1-D (or (N, 1)) names or indices, or one-hot rows."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim == 2 and y.dtype.kind in "fiub":
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise DataError(f"{path}: {key!r} has shape {y.shape} but its rows are not one-hot")
        y = y.argmax(axis=1)
    elif y.ndim != 1:
        raise DataError(f"{path}: {key!r} has shape {y.shape}; expected (N,) labels")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{path}: {key!r} holds float labels that are not whole numbers")
        y = y.astype(np.int64)  # 3.0 names class "3", as an integer label would
    return [str(v) for v in y.tolist()]


def _from_npz(path: Path) -> tuple[dict[str, list[Frame]], dict[str, list[str]]]:
    if not zipfile.is_zipfile(path):
        # np.load would try it as a pickle and word the refusal as a security matter.
        raise DataError(
            f"{path}: not a readable .npz file (not a zip archive; write it with np.savez)"
        )
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = list(arrays.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    color = _npz_color(path, arrays)
    images: dict[str, list[Frame]] = {}
    labels: dict[str, list[str]] = {}
    for split, (ik, lk) in _npz_pairs(path, keys).items():
        try:
            x, y = arrays[ik], arrays[lk]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: cannot read {ik!r} or {lk!r} ({exc})") from None
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images in {ik!r} but {len(y)} labels in {lk!r}")
        images[split] = _frames(path, ik, x, color)
        labels[split] = _labels(path, lk, y)
    return images, labels


def _carve(labels: npt.NDArray[np.int64], wanted: list[str]) -> dict[str, npt.NDArray[np.int64]]:
    """Stratified, seeded split of one set into the wanted splits (fractions renormalised)."""
    fractions = {k: CARVE_FRACTIONS[k] for k in wanted}
    total = sum(fractions.values())
    n = len(labels)
    counts = {k: round(v / total * n) for k, v in fractions.items()}
    first = wanted[0]
    counts[first] += n - sum(counts.values())
    return stratified_split(labels, counts, seed=CARVE_SEED)


def write_splits_npz(splits: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]], path: Path) -> Path:
    """Write splits in the layout load_labelled reads: <split>_images, <split>_labels."""
    arrays: dict[str, Any] = {f"{k}_images": v[0] for k, v in splits.items()}
    arrays |= {f"{k}_labels": v[1] for k, v in splits.items()}
    np.savez(path, **arrays)
    return path


def load_labelled(path: Path, names: list[str] | None = None) -> LabelledData:
    """Read DATA into the four splits, carving missing ones out of train (or of the one set)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        images, raw = _from_folder(path, names)
    elif path.suffix == ".npz":
        images, raw = _from_npz(path)
    else:
        raise DataError(f"{path}: expected a folder (split/label/image) or an .npz file")
    if names is None:
        names = sorted({v for vals in raw.values() for v in vals}, key=_natural_key)
    index = {n: i for i, n in enumerate(names)}
    labels: dict[str, npt.NDArray[np.int64]] = {}
    for split, vals in raw.items():
        unknown = sorted(set(vals) - set(index))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} in split {split!r} are not in {names}")
        labels[split] = np.array([index[v] for v in vals], dtype=np.int64)
    provenance: dict[str, Any] = {"source": str(path), "given_splits": sorted(images)}
    source = "all" if "all" in images else "train"
    missing = [s for s in SPLITS if s not in images]
    if missing:
        if source not in images:
            raise DataError(
                f"{path}: splits {missing} are missing and there is no train split "
                "to carve them from"
            )
        # Train is always re-carved from its source so that no sample sits in two splits.
        wanted = ["train", *[m for m in missing if m != "train"]]
        parts = _carve(labels[source], wanted)
        pool_images, pool_labels = images.pop(source), labels.pop(source)
        for split, idx in parts.items():
            images[split] = [pool_images[i] for i in idx]
            labels[split] = pool_labels[idx]
        provenance["carved"] = {
            "from": source,
            "seed": CARVE_SEED,
            "fractions": {k: CARVE_FRACTIONS[k] for k in wanted},
            "indices": {k: v.tolist() for k, v in parts.items()},
        }
    for split in SPLITS:
        if len(images[split]) == 0:
            raise DataError(f"{path}: split {split!r} is empty")
    return LabelledData(images=images, labels=labels, names=names, provenance=provenance)


def _needs_conversion(frame: Frame, channels: int) -> bool:
    """Would the agent's colour step change what this frame holds for a `channels` model?

    A 1-channel frame for a colour model: yes (grey replicated). A colour frame for a grey
    model: yes, unless its three channels are equal (a grey PNG saved as RGB loses nothing).
    """
    if frame.ndim == 2 or frame.shape[2] == 1:
        return channels == 3
    if channels == 3:
        return False
    bgr = frame[:, :, :3]
    return not (
        np.array_equal(bgr[:, :, 0], bgr[:, :, 1]) and np.array_equal(bgr[:, :, 1], bgr[:, :, 2])
    )


def check_channels(data: LabelledData, spec: Preprocessing, color_given: bool) -> None:
    """Refuse a model/data channel mismatch unless --color said to convert.

    A grey model fed colour images (or a colour model fed grey ones) would be calibrated and
    its budget measured on converted images it was not trained on, against a baseline that the
    conversion already degraded; the user decides that, not a silent default.
    """
    if color_given:
        return
    want = spec.channels
    frames = [f for split in data.images.values() for f in split]
    mismatched = sum(_needs_conversion(f, want) for f in frames)
    if mismatched == 0:
        return
    model = "1 channel (GRAY)" if want == 1 else f"3 channels ({spec.color})"
    kind = "colour (3 channels)" if want == 1 else "grey (1 channel)"
    wanted = "grey" if want == 1 else "colour"
    src = data.provenance.get("source", "the data")
    raise DataError(
        f"{src}: the model's input has {model} but {mismatched} of {len(frames)} images are "
        f"{kind}; pass --color {spec.color} to convert them, or give {wanted} images"
    )
