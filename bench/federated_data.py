"""bench.federated's devices: non-IID shares of the reference data, each behind its own camera.

Every device gets a skewed class mix (per class, a Dirichlet share over the devices, the same
shares for the train and the validation split) and its own brightness / contrast / blur
shift, applied to the uint8 frame before the bundle's preprocessing, as a camera would. Its
frames of the train split are cut into local frames (what its agent probes into the feature
buffer: pseudo labels only, the true labels are kept aside for reporting) and held-out frames
(the union over devices is what the bench reports on); its frames of the validation split
are for choices (the learning rate), never reported as results.

Every frame goes through the base bundle's real stages at full depth once
(StagedModel.probe_frame, what the agent does every probe_every-th frame): a round changes
only the exit heads, never the backbone, so the features stay valid for every round and each
head is evaluated as a matrix product over them (the coordinator's own evaluate.py does the
same). Latency is measured separately with the real sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.federated.collect import Examples, FeatureCollector, LabelMode
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Split = tuple[U8, I64]

# Shifts stay where the reference CNN's final head still answers: it was trained on clean
# MNIST and breaks altogether on a lifted background (measured on the train split: final-head
# accuracy 0.75 at brightness +10, 0.19 at +15), and a device whose final head is wrong has
# nothing to teach its exits. Darker frames, contrast and mild blur leave the final head
# right and make the early exits unsure or wrong: what a round can repair.
BRIGHTNESS = (-40.0, 6.0)
CONTRAST = (0.65, 1.3)
BLUR = (0.0, 0.8)


@dataclass(frozen=True)
class Shift:
    """One camera: pixel * contrast + brightness, then a Gaussian blur of sigma `blur`."""

    brightness: float
    contrast: float
    blur: float

    def apply(self, image: U8) -> U8:
        """The frame as this camera sees it (uint8, same shape)."""
        f = image.astype(np.float32) * np.float32(self.contrast) + np.float32(self.brightness)
        if self.blur > 0:
            f = cv2.GaussianBlur(f, (0, 0), self.blur)
        out: U8 = np.clip(np.rint(f), 0, 255).astype(np.uint8)
        return out

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def draw_shifts(n: int, rng: np.random.Generator) -> list[Shift]:
    """n cameras, each shift uniform in the ranges above."""
    return [
        Shift(
            float(rng.uniform(*BRIGHTNESS)),
            float(rng.uniform(*CONTRAST)),
            float(rng.uniform(*BLUR)),
        )
        for _ in range(n)
    ]


def class_shares(classes: int, devices: int, alpha: float, rng: np.random.Generator) -> F64:
    """(classes, devices): each class's frames split over the devices by Dirichlet(alpha)."""
    shares: F64 = rng.dirichlet(np.full(devices, alpha), size=classes)
    return shares


def partition(labels: I64, shares: F64, rng: np.random.Generator) -> list[I64]:
    """Row indexes of each device: every class's rows cut by its shares, then shuffled."""
    classes, devices = shares.shape
    parts: list[list[int]] = [[] for _ in range(devices)]
    for c in range(classes):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.rint(np.cumsum(shares[c])[:-1] * len(rows)).astype(int)
        for d, chunk in enumerate(np.split(rows, cuts)):
            parts[d].extend(chunk.tolist())
    return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]


@dataclass(frozen=True)
class Probed:
    """Frames through the base bundle at full depth: each early exit's features, final logits.

    labels are the true ones (for reporting only); frames are the shifted camera frames.
    """

    features: list[F32]
    final_logits: F32
    labels: I64
    frames: U8

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, rows: npt.NDArray[np.integer[Any]]) -> Probed:
        """A subset, in the given order."""
        return Probed(
            [f[rows] for f in self.features],
            self.final_logits[rows],
            self.labels[rows],
            self.frames[rows],
        )


def union(sets: Sequence[Probed]) -> Probed:
    """Several sets as one (concatenated in order)."""
    exits = len(sets[0].features)
    return Probed(
        [np.concatenate([s.features[k] for s in sets]) for k in range(exits)],
        np.concatenate([s.final_logits for s in sets]),
        np.concatenate([s.labels for s in sets]),
        np.concatenate([s.frames for s in sets]),
    )


@dataclass
class Device:
    """A simulated device: its camera, its agent's feature buffers, its held-out frames."""

    device_id: str
    shift: Shift
    local: Probed
    holdout: Probed
    validation: Probed
    collector: FeatureCollector

    def examples(
        self, heads: Sequence[int], labels: LabelMode, min_confidence: float
    ) -> dict[int, Examples]:
        """What the agent's worker hands local_update: each head's examples under the rule."""
        return {h: self.collector.examples(h, labels, min_confidence)[1] for h in heads}

    def pseudo_accuracy(self, min_confidence: float) -> tuple[int, float]:
        """(pseudo-labelled local frames kept, share whose pseudo label is the true one)."""
        logits = self.local.final_logits.astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        kept = probs.max(axis=1) >= min_confidence
        right = probs.argmax(axis=1) == self.local.labels
        n = int(kept.sum())
        return n, float(right[kept].mean()) if n else 0.0

    def summary(self, min_confidence: float) -> dict[str, Any]:
        kept, acc = self.pseudo_accuracy(min_confidence)
        return {
            "shift": self.shift.as_dict(),
            "local_frames": len(self.local),
            "holdout_frames": len(self.holdout),
            "validation_frames": len(self.validation),
            "class_mix": np.bincount(self.local.labels, minlength=10).tolist(),
            "pseudo_kept": kept,
            "pseudo_label_accuracy": acc,
        }


def probe_frames(
    model: StagedModel,
    pre: Preprocessor,
    frames: U8,
    labels: I64,
    collector: FeatureCollector | None = None,
) -> Probed:
    """Every frame at full depth through the real stages (what the agent's probe returns).

    With a collector, each probe also goes into it as the agent's inference loop adds it
    (features with the final head's prediction and confidence as the pseudo label).
    """
    exits = len(model.early_exits)
    feats: list[list[F32]] = [[] for _ in range(exits)]
    finals: list[F32] = []
    for frame in frames:
        probe = model.probe_frame(frame, pre)
        if collector is not None:
            collector.add_probe(probe)
        for k in range(exits):
            feats[k].append(probe.features[k])
        finals.append(probe.logits)
    dims = [model.heads[s].weight.shape[1] for s in model.early_exits]  # type: ignore[union-attr]
    return Probed(
        [
            np.asarray(f, np.float32).reshape(len(frames), d)
            for f, d in zip(feats, dims, strict=True)
        ],
        np.asarray(finals, np.float32).reshape(len(frames), -1),
        labels.astype(np.int64),
        frames,
    )


def build_devices(
    model: StagedModel,
    pre: Preprocessor,
    train: Split,
    validation: Split,
    *,
    devices: int,
    alpha: float,
    holdout_fraction: float,
    seed: int,
    frames_per_device: int | None = None,
) -> list[Device]:
    """The bench's fleet: shares, shifts and probes, all from one seed."""
    rng_shares, rng_rows, rng_shift = (np.random.default_rng([seed, i]) for i in range(3))
    shares = class_shares(10, devices, alpha, rng_shares)
    shifts = draw_shifts(devices, rng_shift)
    train_rows = partition(train[1], shares, rng_rows)
    val_rows = partition(validation[1], shares, rng_rows)
    sha = model.verified.manifest_sha256
    out: list[Device] = []
    for i in range(devices):
        shift = shifts[i]
        rows = train_rows[i][:frames_per_device] if frames_per_device else train_rows[i]
        if len(rows) < 4 or len(val_rows[i]) < 1:
            raise ValueError(
                f"device {i} drew {len(rows)} train and {len(val_rows[i])} validation frames: "
                "too few for local and held-out frames (raise --alpha or lower --devices)"
            )
        frames = np.stack([shift.apply(img) for img in train[0][rows]])
        labels = train[1][rows]
        cut = len(rows) - max(1, round(len(rows) * holdout_fraction))
        vrows = val_rows[i]
        if frames_per_device:
            vrows = vrows[: max(1, frames_per_device // 3)]
        vframes = np.stack([shift.apply(img) for img in validation[0][vrows]])
        # The agent's buffers, one slot per local frame (every frame probed: probe_every 1).
        collector = FeatureCollector(1, max(16, cut), 1, sha)
        out.append(
            Device(
                device_id=f"dev-{i:02d}",
                shift=shift,
                local=probe_frames(model, pre, frames[:cut], labels[:cut], collector),
                holdout=probe_frames(model, pre, frames[cut:], labels[cut:]),
                validation=probe_frames(model, pre, vframes, validation[1][vrows]),
                collector=collector,
            )
        )
    return out
