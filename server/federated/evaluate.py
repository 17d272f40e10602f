"""Is a round's result better? Held-out data through the base bundle, or the devices' word.

With a held-out set (--fed-holdout), the base bundle's stages run once over it (onnxruntime,
the stage and branch files the devices run, through the agent's own preprocessing and stage
chain) and each early exit's features are kept; the old and the new heads are then two matrix
products over the same features, judged at the operating point the devices run: accuracy and
exit rate of the whole early-exit model. Without one, the devices' own validation figures
(before and after local training, weighted by their validation sample counts) are compared.
Either way a candidate is accepted only if its accuracy is not worse by more than the round's
tolerance. The numerics below the I/O are pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.protocol import FedUpdate
from edgefleet.agent.runtime.chain import PlainChain, StageSessions
from edgefleet.agent.runtime.confidence import Rule, confidence, decide_exits, softmax
from edgefleet.agent.runtime.preprocess import Preprocessor

F32 = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
# Arrays a holdout .npz may hold, in the optimizer's layout (server/optimize/data.py): one set,
# or splits of which the test split is preferred, then validation.
_HOLDOUT_KEYS = (("images", "labels"), ("test_images", "test_labels"),
                 ("validation_images", "validation_labels"), ("val_images", "val_labels"))


class HoldoutError(ValueError):
    """A held-out set that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Holdout:
    """Labelled camera frames (uint8, grey or BGR) kept on the coordinator for evaluation."""

    images: list[npt.NDArray[np.uint8]]
    labels: list[str]
    source: str

    def label_indices(self, names: Sequence[str]) -> Labels:
        """Labels as class indices of a bundle: by name, else as indices if all are in range."""
        index = {n: i for i, n in enumerate(names)}
        if all(v in index for v in self.labels):
            return np.array([index[v] for v in self.labels], dtype=np.int64)
        if all(v.isdigit() and int(v) < len(names) for v in self.labels):
            return np.array([int(v) for v in self.labels], dtype=np.int64)
        unknown = sorted({v for v in self.labels if v not in index})[:5]
        raise HoldoutError(f"{self.source}: labels {unknown} are not among the bundle's {names}")


def load_holdout(path: Path) -> Holdout:
    """images (N,H,W) or (N,H,W,C) uint8 and labels from an .npz (optimizer layout)."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HoldoutError(f"{path}: not a readable .npz file ({exc})") from None
    with arrays:
        keys = set(arrays.files)
        for ik, lk in _HOLDOUT_KEYS:
            if ik in keys and lk in keys:
                x, y = arrays[ik], arrays[lk]
                break
        else:
            raise HoldoutError(
                f"{path}: expected arrays 'images' and 'labels' (or test_images/test_labels)"
            )
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) == 0:
        raise HoldoutError(f"{path}: {ik!r} must be uint8 (N,H,W) or (N,H,W,C), got {x.shape}")
    if len(x) != len(y):
        raise HoldoutError(f"{path}: {len(x)} images but {len(y)} labels")
    return Holdout(list(x), [str(v) for v in y.tolist()], str(path))


@dataclass(frozen=True)
class ExitValues:
    """What each early exit's head reads for every held-out frame, and the final logits.

    values[k] is (N, D) float32 for early exit k; heads[k] its head from the bundle, None
    when the exit's output already is its logits (no head file).
    """

    values: list[F32]
    heads: list[HeadWeights | None]
    rules: list[Rule]
    final_logits: F32


def exit_values(verified: VerifiedBundle, inputs: Sequence[npt.NDArray[Any]]) -> ExitValues:
    """Run every stage of a bundle over preprocessed inputs (one at a time), keeping exits."""
    m = verified.manifest
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    sessions = [ort.InferenceSession(verified.read(s.file), opts, providers=cpu) for s in m.stages]
    branches = [
        ort.InferenceSession(verified.read(s.exit.graph_file), opts, providers=cpu)
        if s.exit is not None and s.exit.graph_file
        else None
        for s in m.stages
    ]
    # What StagedModel fetches: passed-on tensors, and the exit's own tensor without a branch.
    fetch = [
        [*s.outputs, *([s.exit.output] if s.exit and not s.exit.graph_file else [])]
        for s in m.stages
    ]
    chain = PlainChain(
        StageSessions(m.input.name, sessions, branches, fetch, [list(s.outputs) for s in m.stages])
    )
    early = m.early_exits
    per_exit: list[list[F32]] = [[] for _ in early]
    final: list[F32] = []
    last = len(m.stages) - 1
    for x in inputs:
        chain.load(np.asarray(x))
        for k, stage in enumerate(m.stages):
            outs = chain.stage(k, stage.exit is not None)
            if stage.exit is None:
                continue
            value = np.asarray(chain.exit_value(k, outs), dtype=np.float32).reshape(1, -1)
            if k == last:
                final.append(value)
            else:
                per_exit[early.index(k)].append(value)
    heads: list[HeadWeights | None] = []
    rules: list[Rule] = []
    for k in early:
        head = m.stages[k].exit
        assert head is not None  # early_exits lists stages with an exit
        rules.append(head.rule)
        heads.append(
            HeadWeights.from_npz_bytes(verified.read(head.head_file)) if head.head_file else None
        )
    final_head = m.stages[last].exit
    final_logits = np.concatenate(final)
    if final_head is not None and final_head.head_file:
        fh = HeadWeights.from_npz_bytes(verified.read(final_head.head_file))
        final_logits = (final_logits @ fh.weight.T + fh.bias).astype(np.float32)
    return ExitValues([np.concatenate(v) for v in per_exit], heads, rules, final_logits)


def preprocess(verified: VerifiedBundle, holdout: Holdout) -> list[npt.NDArray[Any]]:
    """The holdout's frames as the bundle's input tensors, through the agent's preprocessing."""
    m = verified.manifest
    pre = Preprocessor(m.preprocessing, dtype=m.input.dtype)
    return [pre(frame) for frame in holdout.images]


# -- pure numerics -------------------------------------------------------------------------------


def head_logits(values: F32, head: HeadWeights | None) -> F32:
    """logits = values @ weight.T + bias, or the values themselves for an exit without head."""
    if head is None:
        return values
    out: F32 = (values @ head.weight.T + head.bias).astype(np.float32)
    return out


def operating_figures(
    early_logits: Sequence[F32],
    final_logits: F32,
    labels: Labels,
    thresholds: Sequence[float | None],
    rules: Sequence[Rule],
) -> tuple[float, float]:
    """(accuracy, early-exit rate) of the whole model at these thresholds.

    Each frame takes the first early exit whose confidence reaches its threshold (None: the
    exit is off), else the final head; the prediction is that exit's top class.
    """
    n = len(labels)
    if not early_logits:
        preds = np.asarray(final_logits).argmax(axis=1)
        return float(np.mean(preds == labels)), 0.0
    confs = [confidence(softmax(z), r) for z, r in zip(early_logits, rules, strict=True)]
    taken = decide_exits(confs, thresholds)
    stacked = np.stack([np.asarray(z).argmax(axis=1) for z in [*early_logits, final_logits]])
    preds = stacked[taken, np.arange(n)]
    return float(np.mean(preds == labels)), float(np.mean(taken < len(early_logits)))


@dataclass(frozen=True)
class HoldoutFigures:
    """The held-out set through the old and the new heads, at one operating point."""

    samples: int
    operating_point: int | None
    thresholds: list[float | None]
    accuracy_before: float
    accuracy_after: float
    exit_rate_before: float
    exit_rate_after: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_heads(
    ev: ExitValues,
    labels: Labels,
    new_heads: Mapping[int, HeadWeights],
    thresholds: Sequence[float | None],
    operating_point: int | None,
) -> HoldoutFigures:
    """Old against new heads (early exit index -> head; the others stay) on the same values."""
    old = [head_logits(v, h) for v, h in zip(ev.values, ev.heads, strict=True)]
    new = [
        head_logits(v, new_heads.get(k, h))
        for k, (v, h) in enumerate(zip(ev.values, ev.heads, strict=True))
    ]
    acc0, rate0 = operating_figures(old, ev.final_logits, labels, thresholds, ev.rules)
    acc1, rate1 = operating_figures(new, ev.final_logits, labels, thresholds, ev.rules)
    return HoldoutFigures(
        len(labels), operating_point, list(thresholds), acc0, acc1, rate0, rate1
    )


@dataclass(frozen=True)
class DeviceFigures:
    """The devices' validation figures before and after training, weighted by val samples."""

    devices: int
    val_samples: int
    accuracy_before: float
    accuracy_after: float
    exit_rate_before: float | None
    exit_rate_after: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_figures(updates: Sequence[FedUpdate]) -> DeviceFigures | None:
    """Weighted means over the updates reporting accuracy before and after; None if none does.

    A device's weight is its validation sample count (its training count when it reports no
    validation samples): a figure from 10 frames must not count like one from 1,000.
    """
    rows = [
        u for u in updates if u.val_accuracy_before is not None and u.val_accuracy_after is not None
    ]
    if not rows:
        return None
    w = np.array([u.val_samples or u.samples for u in rows], dtype=np.float64)
    w /= w.sum()

    def mean(values: Sequence[float | None]) -> float | None:
        if any(v is None for v in values):
            return None
        return float(np.dot(w, np.array(values, dtype=np.float64)))

    acc0 = mean([u.val_accuracy_before for u in rows])
    acc1 = mean([u.val_accuracy_after for u in rows])
    assert acc0 is not None and acc1 is not None
    return DeviceFigures(
        devices=len(rows),
        val_samples=sum(u.val_samples for u in rows),
        accuracy_before=acc0,
        accuracy_after=acc1,
        exit_rate_before=mean([u.val_exit_rate_before for u in rows]),
        exit_rate_after=mean([u.val_exit_rate_after for u in rows]),
    )


def verdict(
    holdout: HoldoutFigures | None, devices: DeviceFigures | None, tolerance: float
) -> tuple[bool, str]:
    """Accept or not, and why: the holdout decides when there is one, else the devices."""
    if holdout is not None:
        before, after, where = holdout.accuracy_before, holdout.accuracy_after, "held-out"
    elif devices is not None:
        before, after, where = devices.accuracy_before, devices.accuracy_after, "devices' val"
    else:
        return False, "no held-out set and no device reported its validation accuracy"
    words = (
        f"{where} accuracy {before:.2%} -> {after:.2%} "
        f"(tolerance {tolerance * 100:.2g} pt)"
    )
    # The epsilon keeps an exactly equal accuracy from failing on float rounding.
    return after >= before - tolerance - 1e-12, words
