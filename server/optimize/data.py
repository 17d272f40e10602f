"""Labelled images for the optimizer: a split/label/image folder tree or an .npz of splits.

Images are kept as the camera would deliver them (uint8, BGR or grey, any size) and go through
the agent's own preprocessing, so calibration sees exactly what devices will compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

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


def _from_npz(path: Path) -> tuple[dict[str, list[Frame]], dict[str, list[str]]]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    images: dict[str, list[Frame]] = {}
    labels: dict[str, list[str]] = {}
    keys = set(arrays.files)
    prefixes = {k[: -len("_images")] for k in keys if k.endswith("_images")}
    if "images" in keys:
        prefixes.add("")
    if not prefixes:
        raise DataError(
            f"{path}: expected arrays '<split>_images' and '<split>_labels' (or 'images')"
        )
    for prefix in sorted(prefixes):
        ik, lk = (f"{prefix}_images", f"{prefix}_labels") if prefix else ("images", "labels")
        if lk not in keys:
            raise DataError(f"{path}: has {ik!r} but no {lk!r}")
        x, y = arrays[ik], arrays[lk]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise DataError(
                f"{path}: {ik!r} must be uint8 (N,H,W) or (N,H,W,C), got {x.dtype} {x.shape}"
            )
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} images in {ik!r} but {len(y)} labels in {lk!r}")
        split = _ALIASES.get(prefix.lower(), "all") if prefix else "all"
        if prefix and prefix.lower() not in _ALIASES:
            raise DataError(f"{path}: unknown split {prefix!r}; use one of {list(SPLITS)}")
        images[split] = list(x)
        labels[split] = [str(v) for v in y.tolist()]
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
