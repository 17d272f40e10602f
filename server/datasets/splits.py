"""Deterministic stratified splits and their JSON record."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

SPLIT_NAMES: Final = ("train", "calibration", "validation", "test")
SPLIT_FORMAT: Final = "edgefleet.split/v1"
SPLIT_METHOD: Final = "stratified-quantile-v1"

# The reference split of MNIST-5k; changing any of these changes every recorded metric.
MNIST5K_SPLIT_SIZES: Final[dict[str, int]] = {
    "train": 3000,
    "calibration": 500,
    "validation": 500,
    "test": 1000,
}
MNIST5K_SPLIT_SEED: Final = 20261125


class SplitMismatchError(ValueError):
    """A recorded split does not match the data it is checked against."""


def _resolve_counts(sizes: Mapping[str, int] | Mapping[str, float], total: int) -> dict[str, int]:
    """Turn split sizes (all counts, or all fractions summing to 1) into exact counts."""
    if not sizes:
        raise ValueError("sizes must name at least one split")
    values = list(sizes.values())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        counts = {name: int(v) for name, v in sizes.items()}
        if any(c < 0 for c in counts.values()) or sum(counts.values()) != total:
            raise ValueError(f"split counts {counts} must be >= 0 and sum to {total}")
        return counts
    fractions = [float(v) for v in values]
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions {dict(sizes)} must be >= 0 and sum to 1")
    # Largest-remainder rounding so the counts always sum to the total; ties go to the
    # split named first, which keeps the result a pure function of the arguments.
    exact = [f * total for f in fractions]
    floors = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return dict(zip(sizes.keys(), floors, strict=True))


def stratified_split(
    labels: ArrayLike,
    sizes: Mapping[str, int] | Mapping[str, float],
    seed: int,
) -> dict[str, NDArray[np.int64]]:
    """Split sample indices into disjoint, covering, class-stratified parts, deterministically."""
    label_array = np.asarray(labels)
    if label_array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {label_array.shape}")
    total = int(label_array.shape[0])
    counts = _resolve_counts(sizes, total)
    rng = np.random.default_rng(seed)
    # Each sample gets its quantile within its own class (after a seeded shuffle); cutting
    # the samples ordered by that quantile into consecutive chunks gives every split
    # each class in proportion, within one sample per class, and exact split sizes.
    quantile = np.empty(total, dtype=np.float64)
    for cls in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == cls))
        quantile[members] = (np.arange(members.size) + 0.5) / members.size
    tiebreak = rng.random(total)
    ordering = np.lexsort((tiebreak, quantile))
    result: dict[str, NDArray[np.int64]] = {}
    start = 0
    for name, count in counts.items():
        chunk = ordering[start : start + count]
        start += count
        # Shuffle within the split so its first items are a fair sample (the video uses
        # the first test items, and the source file is sorted by label).
        result[name] = rng.permutation(chunk).astype(np.int64)
    return result


def class_counts(labels: NDArray[Any], indices: NDArray[np.int64], num_classes: int) -> list[int]:
    """Return how many of the indexed samples fall in each class 0..num_classes-1."""
    return [int(c) for c in np.bincount(labels[indices], minlength=num_classes)]


class Split(BaseModel):
    """A recorded split of one data set: which sample indices belong to which part."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["edgefleet.split/v1"] = SPLIT_FORMAT
    dataset: str
    source_file: str
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_samples: int = Field(gt=0)
    seed: int
    method: Literal["stratified-quantile-v1"] = SPLIT_METHOD
    sizes: dict[str, int]
    class_counts: dict[str, list[int]]
    indices: dict[str, list[int]]

    @model_validator(mode="after")
    def _check_partition(self) -> Split:
        """Reject records whose parts are not a disjoint cover of 0..num_samples-1."""
        if set(self.sizes) != set(self.indices) or set(self.sizes) != set(self.class_counts):
            raise ValueError("sizes, class_counts and indices must name the same splits")
        for name, idx in self.indices.items():
            if len(idx) != self.sizes[name] or sum(self.class_counts[name]) != len(idx):
                raise ValueError(f"split {name!r} size disagrees with its indices")
        every = [i for idx in self.indices.values() for i in idx]
        if len(every) != len(set(every)):
            raise ValueError("splits overlap")
        if sorted(every) != list(range(self.num_samples)):
            raise ValueError(f"splits do not cover 0..{self.num_samples - 1} exactly")
        return self

    def arrays(self) -> dict[str, NDArray[np.int64]]:
        """Return each split's indices as an int64 array, in recorded order."""
        return {name: np.asarray(idx, dtype=np.int64) for name, idx in self.indices.items()}

    def to_json(self) -> str:
        """Serialise with one line per index list, so the file stays small and diffable."""
        data = self.model_dump()
        lines = ["{"]
        keys = list(data)
        for k, key in enumerate(keys):
            comma = "," if k < len(keys) - 1 else ""
            value = data[key]
            if isinstance(value, dict):
                lines.append(f"  {json.dumps(key)}: {{")
                names = list(value)
                for j, name in enumerate(names):
                    inner = "," if j < len(names) - 1 else ""
                    lines.append(f"    {json.dumps(name)}: {json.dumps(value[name])}{inner}")
                lines.append(f"  }}{comma}")
            else:
                lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def save(self, path: Path) -> None:
        """Write the record as JSON to path."""
        path.write_text(self.to_json(), encoding="utf-8")


def make_split(
    *,
    dataset: str,
    source_file: str,
    source_sha256: str,
    labels: ArrayLike,
    sizes: Mapping[str, int] | Mapping[str, float],
    seed: int,
) -> Split:
    """Compute a stratified split of labels and wrap it in a Split record."""
    label_array = np.asarray(labels, dtype=np.int64)
    parts = stratified_split(label_array, sizes, seed)
    num_classes = int(label_array.max()) + 1 if label_array.size else 0
    return Split(
        dataset=dataset,
        source_file=source_file,
        source_sha256=source_sha256,
        num_samples=int(label_array.shape[0]),
        seed=seed,
        sizes={name: int(idx.size) for name, idx in parts.items()},
        class_counts={
            name: class_counts(label_array, idx, num_classes) for name, idx in parts.items()
        },
        indices={name: [int(i) for i in idx] for name, idx in parts.items()},
    )


def load_split(path: Path) -> Split:
    """Read and validate a Split record from a JSON file."""
    return Split.model_validate_json(Path(path).read_text(encoding="utf-8"))


def verify_split(split: Split, labels: ArrayLike, source_sha256: str | None = None) -> None:
    """Raise SplitMismatchError unless split is exactly what recomputing it on labels gives."""
    label_array = np.asarray(labels, dtype=np.int64)
    if source_sha256 is not None and source_sha256 != split.source_sha256:
        raise SplitMismatchError(
            f"{split.dataset}: source sha256 {source_sha256} differs from the recorded "
            f"{split.source_sha256}"
        )
    if label_array.shape != (split.num_samples,):
        raise SplitMismatchError(
            f"{split.dataset}: {label_array.shape[0]} labels, split records {split.num_samples}"
        )
    fresh = stratified_split(label_array, split.sizes, split.seed)
    recorded = split.arrays()
    for name, idx in fresh.items():
        if not np.array_equal(idx, recorded[name]):
            raise SplitMismatchError(f"{split.dataset}: split {name!r} differs when recomputed")
    num_classes = len(next(iter(split.class_counts.values())))
    for name, idx in recorded.items():
        if class_counts(label_array, idx, num_classes) != split.class_counts[name]:
            raise SplitMismatchError(f"{split.dataset}: class counts of {name!r} differ")
