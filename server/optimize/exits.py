"""Early exits: choose cut points by MACs, fit pooled linear heads, calibrate thresholds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet.agent.runtime.confidence import Rule
from edgefleet.agent.runtime.staged import exit_decision

from .errors import ModelError
from .heads import LinearHead, fit_softmax_regression, select_l2
from .macs import cumulative_macs_at, total_macs
from .risk import drop_bound, fixed_sequence
from .runner import make_session, run_outputs
from .split import add_exit_features, articulation_tensors, quantized_alias
from .thresholds import (
    PointStats,
    choose_default,
    common_threshold_path,
    evaluate_thresholds,
    pareto_operating_points,
    per_sample_correct,
)

F32 = npt.NDArray[np.float32]
Progress = Callable[[str], None]
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
# Exits closer than this to either end save too little (or decide too blindly) to be worth it.
MIN_FRACTION, MAX_FRACTION = 0.05, 0.9
MANIFEST_POINTS = 8


@dataclass(frozen=True)
class CutPoint:
    """An exit after `tensor`, reached after `macs` multiply-accumulates."""

    tensor: str  # the tensor in the (quantized) model the stage ends at
    source: str  # the tensor name in the fp32 model the user knows
    macs: int


def _candidates(model: onnx.ModelProto) -> list[str]:
    """Articulation tensors worth cutting at: uint8 QuantizeLinear outputs in a QDQ model."""
    arts = articulation_tensors(model)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    has_qdq = any(op == "QuantizeLinear" for op in producers.values())
    if has_qdq:
        return [t for t in arts if producers.get(t) == "QuantizeLinear"]
    return [t for t in arts if producers.get(t) not in ("Flatten", "Reshape", "GlobalAveragePool")]


def _source_name(model: onnx.ModelProto, tensor: str) -> str:
    for node in model.graph.node:
        if tensor in node.output and node.op_type == "QuantizeLinear":
            return str(node.input[0])
    return tensor


def choose_cuts(
    model: onnx.ModelProto,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    names: Sequence[str] | None = None,
) -> list[CutPoint]:
    """Cut points near the given fractions of total MACs, or at user-named tensors."""
    total = total_macs(model)
    if names:
        tensors = []
        valid = set(articulation_tensors(model))
        for name in names:
            t = quantized_alias(model, name)
            if t not in valid:
                raise ModelError(
                    f"--exits tensor {name!r} is not a valid cut point (unknown, or bypassed by "
                    "a residual connection); valid ones include "
                    f"{[_source_name(model, c) for c in _candidates(model)][:12]}"
                )
            tensors.append(t)
        macs = cumulative_macs_at(model, tensors)
        cuts = [CutPoint(t, _source_name(model, t), macs[t]) for t in tensors]
        if [c.macs for c in cuts] != sorted(c.macs for c in cuts):
            raise ModelError("--exits tensors must be given in graph order")
        return cuts
    cands = _candidates(model)
    macs = cumulative_macs_at(model, cands)
    usable = [t for t in cands if MIN_FRACTION <= macs[t] / total <= MAX_FRACTION]
    chosen: list[str] = []
    for f in fractions:
        free = [t for t in usable if t not in chosen]
        if not free:
            break
        best = min(free, key=lambda t: (abs(macs[t] / total - f), macs[t]))
        chosen.append(best)
    chosen = sorted(set(chosen), key=lambda t: macs[t])
    return [CutPoint(t, _source_name(model, t), macs[t]) for t in chosen]


@dataclass
class ExitFeatures:
    """Pooled features at each cut and the final logits, per split."""

    features: dict[str, list[F32]]
    final_logits: dict[str, F32]


def collect_features(
    model: onnx.ModelProto,
    cuts: Sequence[CutPoint],
    data: dict[str, F32],
    *,
    grid: int = 1,
    threads: int = 1,
) -> ExitFeatures:
    """Run the model once per sample with pooled exit features exposed as outputs."""
    with_exits, names = add_exit_features(model, [c.tensor for c in cuts], grid)
    sess = make_session(with_exits, threads)
    fetch = [*names, model.graph.output[0].name]
    feats: dict[str, list[F32]] = {}
    logits: dict[str, F32] = {}
    for split, x in data.items():
        stacked = [
            np.asarray(v, dtype=np.float32).reshape(x.shape[0], -1)
            for v in run_outputs(sess, x, fetch)
        ]
        feats[split], logits[split] = stacked[:-1], stacked[-1]
    return ExitFeatures(feats, logits)


@dataclass
class ExitPlan:
    """Fitted heads, operating points and the chosen default."""

    cuts: list[CutPoint]
    heads: list[LinearHead]
    rule: Rule
    costs: list[float]  # cumulative MACs per exit, final head last
    points: list[PointStats]
    default: int
    within_budget: bool
    head_l2: list[float] = field(default_factory=list)
    val_exit_accuracy: list[float] = field(default_factory=list)
    certification: dict[str, Any] | None = None  # risk.py's figures, when a confidence is set


def exit_logits(plan_heads: Sequence[LinearHead], feats: ExitFeatures, split: str) -> list[F32]:
    """Logits of every exit on a split, final head last."""
    return [h.logits(f) for h, f in zip(plan_heads, feats.features[split], strict=True)] + [
        feats.final_logits[split]
    ]


def plan_exits(
    model: onnx.ModelProto,
    cuts: list[CutPoint],
    feats: ExitFeatures,
    labels: dict[str, npt.NDArray[np.int64]],
    *,
    classes: int,
    reference_accuracy: float,
    max_drop: float,
    rule: Rule = "max_softmax",
    reference_correct: dict[str, npt.NDArray[np.bool_]] | None = None,
    confidence: float | None = None,
    first_is_reference: bool = False,
    progress: Progress = lambda _m: None,
) -> ExitPlan:
    """Fit one head per cut on train, then pick thresholds on validation within the budget.

    With a confidence, the default is certified (risk.py): threshold sets in a fixed order
    from cautious to eager (common_threshold_path) are tested on validation against the fp32
    model's per-sample results (reference_correct) in that order; the fastest certified one is
    the default. first_is_reference says the model without exits *is* the reference (no
    quantization), so that first candidate holds exactly and needs no bound.
    """
    total = float(total_macs(model))
    heads: list[LinearHead] = []
    l2s: list[float] = []
    for k, cut in enumerate(cuts):
        tr, va = feats.features["train"][k], feats.features["validation"][k]
        l2 = select_l2(tr, labels["train"], va, labels["validation"], classes)
        head = fit_softmax_regression(tr, labels["train"], classes, l2=l2)
        heads.append(head)
        l2s.append(l2)
        acc = float(np.mean(head.predict(va) == labels["validation"]))
        progress(
            f"exit {k} after {cut.source} ({cut.macs / total:.0%} MACs): head accuracy {acc:.4f}"
        )
    conf, correct = _split_measurements(heads, feats, labels, rule, "validation")
    head_macs = [h.classes * h.features for h in heads]
    costs = [float(c.macs + m) for c, m in zip(cuts, head_macs, strict=True)] + [total]
    front = pareto_operating_points(conf, correct, costs, max_points=10_000)
    certification: dict[str, Any] | None = None
    if confidence is None or reference_correct is None:
        default, ok = choose_default(front, reference_accuracy, max_drop)
    else:
        chosen, certification = _certified_default(
            costs,
            conf,
            correct,
            reference_correct,
            max_drop=max_drop,
            confidence=confidence,
            first_is_reference=first_is_reference,
        )
        ok = certification["certified"] > 0
        front = _with_point(front, chosen)
        default = front.index(chosen)
        progress(
            f"certified {certification['certified']} of {certification['tested']} threshold "
            f"sets at {confidence:.0%} confidence; default drop "
            f"{100 * certification['default']['drop']:.2f} pt, bound "
            f"{100 * certification['default']['drop_upper']:.2f} pt "
            f"(budget {100 * max_drop:.2f} pt, {certification['default']['n']} images)"
        )
    points, default = _thin_keeping(front, default, MANIFEST_POINTS)
    if confidence is not None and reference_correct is not None and certification is not None:
        ref = reference_correct["validation"]
        certification["points"] = [
            drop_bound(ref, per_sample_correct(conf, correct, p.thresholds), confidence).to_report()
            for p in points
        ]
    return ExitPlan(
        cuts=cuts,
        heads=heads,
        rule=rule,
        costs=costs,
        points=points,
        default=default,
        within_budget=ok,
        head_l2=l2s,
        val_exit_accuracy=[float(np.mean(c)) for c in correct],
        certification=certification,
    )


def _split_measurements(
    heads: Sequence[LinearHead],
    feats: ExitFeatures,
    labels: dict[str, npt.NDArray[np.int64]],
    rule: Rule,
    split: str,
) -> tuple[list[npt.NDArray[np.float64]], list[npt.NDArray[np.bool_]]]:
    """Each exit's confidence and correctness per sample, in the device's own arithmetic.

    Row by row through the agent's exit_decision, on float32 head logits of one frame at a
    time: a batched matrix product may round differently from the device's one-row product,
    and a threshold calibrated on other bits than a device computes moves frames.
    """
    y = labels[split]
    conf: list[npt.NDArray[np.float64]] = []
    correct: list[npt.NDArray[np.bool_]] = []
    for head, f in zip(heads, feats.features[split], strict=True):
        decided = [exit_decision(head.logits(f[i : i + 1]), rule) for i in range(f.shape[0])]
        conf.append(np.array([d[2] for d in decided], dtype=np.float64))
        correct.append(np.array([d[0] for d in decided]) == y)
    correct.append(feats.final_logits[split].argmax(-1) == y)
    return conf, correct


def _certified_default(
    costs: list[float],
    conf: list[npt.NDArray[np.float64]],
    correct: list[npt.NDArray[np.bool_]],
    reference_correct: dict[str, npt.NDArray[np.bool_]],
    *,
    max_drop: float,
    confidence: float,
    first_is_reference: bool,
) -> tuple[PointStats, dict[str, Any]]:
    """The fastest threshold set that fixed-sequence testing certifies on validation.

    The sequence is common_threshold_path: every exit off, then one threshold for all exits
    from cautious to eager. It depends on no data, so every set before the first failure
    holds the budget at once at the stated confidence.
    """
    path = common_threshold_path(len(conf))
    ref = reference_correct["validation"]
    start = 1 if first_is_reference else 0
    seq = fixed_sequence(
        ref, (per_sample_correct(conf, correct, t) for t in path[start:]), max_drop, confidence
    )
    certified = seq.certified + start
    stats = [evaluate_thresholds(conf, correct, costs, t) for t in path[: max(certified, 1)]]
    if certified == 0:
        best = 0  # nothing holds: every exit off, flagged by the caller
    else:
        best = min(range(certified), key=lambda i: (stats[i].mean_cost, -stats[i].accuracy, i))
    bound = drop_bound(ref, per_sample_correct(conf, correct, path[best]), confidence)
    report = {
        "method": "fixed-sequence testing of Clopper-Pearson bounds (docs/optimize.md)",
        "confidence": confidence,
        "budget": max_drop,
        "sequence": "one threshold for every exit, from 1 - 1e-9 down to 0",
        "tested": len(seq.bounds) + start,
        "sequence_length": len(path),
        "certified": certified,
        "default": bound.to_report(),
        "first_failure_thresholds": (
            list(path[len(seq.bounds) - 1 + start]) if seq.certified < len(seq.bounds) else None
        ),
        "first_failure": (seq.bounds[-1].to_report() if seq.certified < len(seq.bounds) else None),
    }
    return stats[best], report


def _with_point(front: list[PointStats], point: PointStats) -> list[PointStats]:
    """The front with `point` added in cost order (accurate to fast), unless already there."""
    if point in front:
        return front
    merged = [*front, point]
    merged.sort(key=lambda p: (-p.mean_cost, -p.accuracy))
    return merged


def _thin_keeping(points: list[PointStats], keep: int, count: int) -> tuple[list[PointStats], int]:
    """At most count points spread along the front (accurate to fast), always keeping `keep`."""
    if len(points) <= count:
        return points, keep
    picks = {round(float(i)) for i in np.linspace(0, len(points) - 1, count - 1)} | {keep}
    while len(picks) > count:
        removable = sorted(picks - {keep, 0, len(points) - 1})
        picks.discard(removable[len(removable) // 2])
    ordered = sorted(picks)
    return [points[i] for i in ordered], ordered.index(keep)
