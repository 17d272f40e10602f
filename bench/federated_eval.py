"""bench.federated's measures: heads judged on probed frames, and latency of the real bundle.

Accuracy and exit rate come from the frames' features (probed once through the real stages)
and a set of exit heads, decided exactly as the runtime decides (first exit whose confidence
reaches its threshold, else the final head): pure numerics, the same for our rounds, the
central heads and Flower's. Latency needs the real thing: two StagedModels (round 0's bundle
and a round's) run the same frames alternately, and the stage times each frame actually ran
are summed, so load on the machine hits both alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.runtime.confidence import Rule, confidence, decide_exits, softmax
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel

from .federated_data import Probed

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Figures:
    """Accuracy (true labels), early-exit rate, and the share answered at each exit."""

    accuracy: float
    exit_rate: float
    exits: list[float]  # early exits in order, the final head last


def bundle_heads(verified: VerifiedBundle) -> list[HeadWeights]:
    """Every early exit's head weights (each must have a head file, as optimizer bundles do)."""
    m = verified.manifest
    heads = []
    for stage in m.early_exits:
        spec = m.stages[stage].exit
        if spec is None or spec.head_file is None:
            raise ValueError(f"early exit at stage {stage} has no head file")
        heads.append(HeadWeights.from_npz_bytes(verified.read(spec.head_file)))
    return heads


def exits_taken(
    heads: Sequence[HeadWeights],
    data: Probed,
    thresholds: Sequence[float | None],
    rules: Sequence[Rule],
) -> tuple[I64, I64]:
    """(exit taken, class predicted) per frame: the runtime's rule on the probed features."""
    logits = [
        (x @ h.weight.T + h.bias).astype(np.float32)
        for x, h in zip(data.features, heads, strict=True)
    ]
    confs = [confidence(softmax(z), r) for z, r in zip(logits, rules, strict=True)]
    taken = decide_exits(confs, thresholds).astype(np.int64)
    stacked = np.stack([z.argmax(axis=1) for z in [*logits, data.final_logits]])
    preds: I64 = stacked[taken, np.arange(len(data))].astype(np.int64)
    return taken, preds


def figures(
    heads: Sequence[HeadWeights],
    data: Probed,
    thresholds: Sequence[float | None],
    rules: Sequence[Rule],
) -> Figures:
    """The early-exit model with these heads on these frames at these thresholds."""
    taken, preds = exits_taken(heads, data, thresholds, rules)
    n_exits = len(heads) + 1
    shares = np.bincount(taken, minlength=n_exits) / max(1, len(data))
    return Figures(
        accuracy=float(np.mean(preds == data.labels)),
        exit_rate=float(np.mean(taken < len(heads))),
        exits=[float(s) for s in shares],
    )


@dataclass(frozen=True)
class Latency:
    """Mean ms per frame in the stages actually run, round 0's bundle and a round's, and
    the round's own answers from the real sessions (to check the numeric figures)."""

    base_ms: float
    new_ms: float
    new_accuracy: float
    new_exit_rate: float

    @property
    def ratio(self) -> float:
        return self.new_ms / self.base_ms


def interleaved_latency(
    base: StagedModel, new: StagedModel, pre: Preprocessor, data: Probed, passes: int
) -> Latency:
    """Both models on every frame, alternating which goes first; stage ms summed per frame.

    Stage times (Prediction.stage_ms, the sessions the frame ran) leave out preprocessing,
    which both do alike. Each frame's time is its fastest of the passes (a frame hit by
    another process's burst on this shared machine is timed again), then the mean over
    frames. The first pass's answers give the real model's accuracy and exit rate, which
    must agree with figures() on the same heads (reported side by side).
    """
    exits = len(new.early_exits)
    n = len(data)
    base_ms = np.full(n, np.inf)
    new_ms = np.full(n, np.inf)
    right = early = 0
    for p in range(max(1, passes)):
        for i, frame in enumerate(data.frames):
            first, second = (base, new) if (i + p) % 2 == 0 else (new, base)
            a = first.predict_frame(frame, pre)
            b = second.predict_frame(frame, pre)
            pa, pb = (a, b) if first is base else (b, a)
            base_ms[i] = min(base_ms[i], sum(pa.stage_ms))
            new_ms[i] = min(new_ms[i], sum(pb.stage_ms))
            if p == 0:
                right += int(pb.class_index == int(data.labels[i]))
                early += int(pb.exit_index < exits)
    return Latency(float(base_ms.mean()), float(new_ms.mean()), right / n, early / n)


def warmed(verified: VerifiedBundle) -> StagedModel:
    """The bundle's staged model, its sessions warmed up (one thread, as on a device)."""
    model = StagedModel(verified)
    model.warm_up()
    return model
