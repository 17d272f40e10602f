"""The health check a verified bundle passes before the agent switches to it.

Verification proves a bundle is the one the coordinator signed; this proves it runs here:
it loads with this device's onnxruntime and providers, gives no NaN/inf, reproduces the
optimizer's recorded outputs on the golden inputs (manifest `health`), and is not far slower
than the optimizer measured for this class of device. The model it built is returned, so the
caller hot-swaps the very sessions that were checked instead of building them again.

A detect bundle (manifest task "detect") is checked by its decoded boxes instead of
probabilities (`match_detections`): every golden box must be found again, same class, at
IoU >= min_iou and score within atol, unless its recorded score is within atol of its class's
threshold (such a box may appear or vanish on a CPU whose INT8 kernels round differently),
and no new box may score above threshold + atol.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import BundleError, VerifiedBundle
from edgefleet.agent.bundle.manifest import HealthSpec, Manifest
from edgefleet.agent.detect.boxes import Detections, iou_matrix
from edgefleet.agent.detect.decode import decode, score_thresholds
from edgefleet.agent.runtime.confidence import softmax
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.runtime.staged import StagedModel

CheckValue = float | int | bool | str | None
Model = StagedModel | DetectorModel
MAX_GOLDEN = 256
# A shifted box loses IoU fast (a box moved by a tenth of its width keeps about 0.82), while
# INT8 rounding moves a box's edges by a fraction of a pixel.
DEFAULT_MIN_IOU = 0.8
# Two runs of the same sessions on the same input: float noise at most (a GPU provider may
# sum in another order), never a different box.
SAME_RUN_PX, SAME_RUN_SCORE = 1e-3, 1e-5


@dataclass(frozen=True)
class HealthReport:
    """ok, a one-line reason, flat numbers for an event's details, and the model if it loaded."""

    ok: bool
    reason: str
    checks: dict[str, CheckValue] = field(default_factory=dict)
    model: Model | None = field(default=None, repr=False, compare=False)


class _Failed(Exception):
    """A check failed; the message is the report's reason."""


@dataclass(frozen=True)
class Golden:
    """The golden file's arrays, checked against the manifest."""

    inputs: npt.NDArray[np.generic]
    probs: npt.NDArray[np.float64]
    exit_index: npt.NDArray[np.int64]
    class_index: npt.NDArray[np.int64]


def _input_shape(m: Manifest) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in m.input.shape]


def load_golden(verified: VerifiedBundle, spec: HealthSpec) -> Golden:
    """Read and shape-check the golden .npz (the bundle is verified; its shapes may still lie)."""
    m = verified.manifest
    name = spec.golden_file
    try:
        arrays = np.load(io.BytesIO(verified.read(name)), allow_pickle=False)
        inputs = np.asarray(arrays["inputs"])
        probs = np.asarray(arrays["probs"], dtype=np.float64)
        exit_index = np.asarray(arrays["exit_index"], dtype=np.int64)
        class_index = np.asarray(arrays["class_index"], dtype=np.int64)
    except (KeyError, ValueError, OSError, BundleError) as exc:
        raise _Failed(f"golden file {name} unreadable: {exc}") from exc
    _check_inputs(m, name, inputs)
    n = inputs.shape[0]
    if probs.shape != (n, len(m.labels)) or exit_index.shape != (n,) or class_index.shape != (n,):
        raise _Failed(
            f"golden file {name}: probs {probs.shape}, exit_index {exit_index.shape}, "
            f"class_index {class_index.shape} do not fit {n} inputs of {len(m.labels)} classes"
        )
    if not np.isfinite(probs).all():
        raise _Failed(f"golden file {name}: the recorded probs hold NaN or inf")
    return Golden(inputs, probs, exit_index, class_index)


def _final_probs(model: StagedModel, x: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """Softmax of the final head with every exit evaluated but none taken; NaN checked."""
    logits = model.all_exit_logits(x)
    for k, z in enumerate(logits):
        if not np.isfinite(z).all():
            raise _Failed(f"exit {k} outputs NaN or inf")
    probs: npt.NDArray[np.float64] = softmax(logits[-1])[0]
    return probs


def _margin(p: npt.NDArray[np.float64]) -> float:
    top = np.sort(p)[::-1]
    return float(top[0] - top[1]) if len(top) > 1 else 1.0


def _check_golden(
    model: StagedModel, spec: HealthSpec, g: Golden, checks: dict[str, CheckValue]
) -> None:
    dtype = np.dtype(model.manifest.input.dtype)
    worst, worst_i = 0.0, 0
    excused = agree = 0
    first_disagree: int | None = None
    for i in range(g.inputs.shape[0]):
        probs = _final_probs(model, g.inputs[i : i + 1].astype(dtype, copy=False))
        diff = float(np.abs(probs - g.probs[i]).max())
        if diff > worst:
            worst, worst_i = diff, i
        if _margin(g.probs[i]) < spec.atol:
            excused += 1
        elif int(probs.argmax()) == int(g.probs[i].argmax()):
            agree += 1
        elif first_disagree is None:
            first_disagree = i
    judged = g.inputs.shape[0] - excused
    agreement = agree / judged if judged else 1.0
    checks.update(
        golden_inputs=int(g.inputs.shape[0]),
        golden_kind=spec.golden_kind,
        max_prob_diff=round(worst, 6),
        worst_input=worst_i,
        agreement=round(agreement, 4),
        excused=excused,
    )
    if worst > spec.atol:
        raise _Failed(
            f"golden input {worst_i}: probabilities differ by {worst:.4f} (atol {spec.atol})"
        )
    # A synthetic golden input (a plain model packed without data) means nothing as a class:
    # its outputs check determinism and NaN only, so top-1 agreement is not judged there.
    if spec.golden_kind == "validation" and agreement < spec.min_agreement:
        raise _Failed(
            f"top-1 agrees on {agreement:.0%} of golden inputs (min {spec.min_agreement:.0%}); "
            f"first disagreement: input {first_disagree}"
        )


def _min_latency_ms(model: StagedModel, x: npt.NDArray[np.generic], runs: int) -> float:
    """Minimum full-depth (all exits disabled) ms per frame over `runs` runs.

    The minimum, not the median: the old model keeps running on the same cores during the
    check, and the minimum is the run it disturbed least.
    """
    saved = list(model.thresholds)
    model.set_thresholds([None] * len(model.early_exits))
    try:
        model.predict(x)  # first run allocates; not timed
        best = math.inf
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            pred = model.predict(x)
            best = min(best, (time.perf_counter() - t0) * 1000.0)
            if not math.isfinite(pred.confidence):
                raise _Failed("the final head's probability is NaN or inf")
        return best
    finally:
        model.set_thresholds(saved)


# -- detectors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectGolden:
    """A detector's golden file: inputs, and each input's decoded boxes (input-tensor px)."""

    inputs: npt.NDArray[np.generic]
    detections: list[Detections]


def load_detect_golden(verified: VerifiedBundle, spec: HealthSpec) -> DetectGolden:
    """Read and check a detector's golden .npz (HealthSpec's docstring has the format)."""
    m = verified.manifest
    name = spec.golden_file
    try:
        arrays = np.load(io.BytesIO(verified.read(name)), allow_pickle=False)
        inputs = np.asarray(arrays["inputs"])
        boxes = np.asarray(arrays["boxes"], dtype=np.float32)
        scores = np.asarray(arrays["scores"], dtype=np.float32)
        classes = np.asarray(arrays["classes"], dtype=np.int64)
        image_index = np.asarray(arrays["image_index"], dtype=np.int64)
    except (KeyError, ValueError, OSError, BundleError) as exc:
        raise _Failed(f"golden file {name} unreadable: {exc}") from exc
    _check_inputs(m, name, inputs)
    n, k = inputs.shape[0], len(scores)
    if (
        boxes.shape != (k, 4)
        or scores.shape != (k,)
        or classes.shape != (k,)
        or (image_index.shape != (k,))
    ):
        raise _Failed(
            f"golden file {name}: boxes {boxes.shape}, scores {scores.shape}, classes "
            f"{classes.shape}, image_index {image_index.shape} are not M boxes"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise _Failed(f"golden file {name}: the recorded boxes or scores hold NaN or inf")
    if k and not (classes.min() >= 0 and classes.max() < len(m.labels)):
        raise _Failed(f"golden file {name}: a class index outside 0..{len(m.labels) - 1}")
    if k and not (image_index.min() >= 0 and image_index.max() < n):
        raise _Failed(f"golden file {name}: an image_index outside 0..{n - 1}")
    per_input = [
        Detections(boxes[image_index == i], scores[image_index == i], classes[image_index == i])
        for i in range(n)
    ]
    return DetectGolden(inputs, per_input)


def _check_inputs(m: Manifest, name: str, inputs: npt.NDArray[np.generic]) -> None:
    n = inputs.shape[0] if inputs.ndim else 0
    want = _input_shape(m)[1:]
    symbolic = [not isinstance(d, int) for d in m.input.shape[1:]]
    if not 1 <= n <= MAX_GOLDEN:
        raise _Failed(f"golden file {name}: {n} inputs (1..{MAX_GOLDEN} allowed)")
    got = list(inputs.shape[1:])
    if len(got) != len(want) or any(
        g != w and not s for g, w, s in zip(got, want, symbolic, strict=False)
    ):
        raise _Failed(f"golden file {name}: inputs shape {inputs.shape} does not fit {want}")
    if inputs.dtype not in (np.float32, np.uint8):
        raise _Failed(f"golden file {name}: inputs dtype {inputs.dtype} (float32 or uint8)")


def detect_input(model: DetectorModel, x: npt.NDArray[np.generic]) -> Detections:
    """One preprocessed input's boxes in input-tensor pixels at the bundle's own thresholds.

    What the optimizer records as golden and what a device compares: a device's own
    detect.class_thresholds are its operator's choice, not the bundle's behaviour.
    """
    outs, _ = model.run(x)
    for name, out in zip(model.spec.outputs, outs, strict=True):
        if not np.isfinite(np.asarray(out)).all():
            raise _Failed(f"output {name!r} holds NaN or inf")
    return decode(outs, model.spec, model.manifest.labels, model.input_hw)


@dataclass(frozen=True)
class BoxMatch:
    """How one input's boxes compare with its golden boxes; `failures` worded, worst first."""

    matched: int
    excused: int
    new_below: int  # unmatched new boxes within atol of their threshold (allowed)
    worst_iou: float  # lowest IoU of a matched pair (1.0 when none matched)
    max_score_diff: float
    failures: list[str]


def _box(b: npt.NDArray[np.float32]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in b) + "]"


def match_detections(
    golden: Detections,
    found: Detections,
    thresholds: npt.NDArray[np.float32],
    labels: Sequence[str],
    *,
    min_iou: float,
    atol: float,
) -> BoxMatch:
    """Greedy one-to-one match of golden to found boxes, best golden score first.

    A golden box is matched by the unmatched found box of its class with the highest IoU,
    if that IoU >= min_iou; a matched score must be within atol. An unmatched golden box is
    excused when its score <= its class threshold + atol; an unmatched found box fails when
    its score > its class threshold + atol.
    """
    iou = iou_matrix(golden.boxes, found.boxes)
    used = np.zeros(len(found), dtype=bool)
    failures: list[str] = []
    matched = excused = new_below = 0
    worst_iou, max_diff = 1.0, 0.0
    for g in np.argsort(-golden.scores, kind="stable"):
        c, score = int(golden.classes[g]), float(golden.scores[g])
        label, limit = labels[c], float(thresholds[c]) + atol
        free = (found.classes == c) & ~used
        row = np.where(free, iou[g], -1.0)
        j = int(row.argmax()) if len(row) else -1
        best = float(row[j]) if j >= 0 and free[j] else None
        if best is not None and best >= min_iou:
            used[j] = True
            matched += 1
            diff = abs(float(found.scores[j]) - score)
            worst_iou, max_diff = min(worst_iou, best), max(max_diff, diff)
            if diff > atol:
                failures.append(
                    f"class {label!r} golden box {_box(golden.boxes[g])} score {score:.3f} "
                    f"is found at IoU {best:.3f} but scores {float(found.scores[j]):.3f} "
                    f"(atol {atol:g})"
                )
        elif score <= limit:
            excused += 1
        elif best is None:
            failures.append(
                f"class {label!r} golden box {_box(golden.boxes[g])} score {score:.3f}: "
                f"no box of that class found"
            )
        else:
            failures.append(
                f"class {label!r} golden box {_box(golden.boxes[g])} score {score:.3f}: best "
                f"match {_box(found.boxes[j])} at IoU {best:.3f} (min {min_iou:g})"
            )
    for k in np.flatnonzero(~used):
        j = int(k)
        c, score = int(found.classes[j]), float(found.scores[j])
        limit = float(thresholds[c]) + atol
        if score <= limit:
            new_below += 1
            continue
        same = golden.classes == c
        best = float(iou[same, j].max()) if same.any() else 0.0
        failures.append(
            f"class {labels[c]!r} new box {_box(found.boxes[j])} score {score:.3f} (above "
            f"threshold {float(thresholds[c]):g} + atol {atol:g}) matches no golden box "
            f"(best IoU {best:.3f})"
        )
    return BoxMatch(matched, excused, new_below, worst_iou, max_diff, failures)


def _same_run(a: Detections, b: Detections) -> bool:
    return (
        len(a) == len(b)
        and bool(np.array_equal(a.classes, b.classes))
        and bool(np.allclose(a.boxes, b.boxes, rtol=0, atol=SAME_RUN_PX))
        and bool(np.allclose(a.scores, b.scores, rtol=0, atol=SAME_RUN_SCORE))
    )


def _check_detect_golden(
    model: DetectorModel, spec: HealthSpec, g: DetectGolden, checks: dict[str, CheckValue]
) -> None:
    m = model.manifest
    dtype = np.dtype(m.input.dtype)
    thresholds = score_thresholds(model.spec, m.labels)
    min_iou = spec.min_iou if spec.min_iou is not None else DEFAULT_MIN_IOU
    matched = excused = new_below = 0
    worst_iou, max_diff = 1.0, 0.0
    failures: list[str] = []
    for i in range(g.inputs.shape[0]):
        x = g.inputs[i : i + 1].astype(dtype, copy=False)
        try:
            found = detect_input(model, x)
            again = detect_input(model, x)
        except _Failed as exc:
            raise _Failed(f"golden input {i}: {exc}") from None
        if not _same_run(found, again):
            raise _Failed(
                f"golden input {i}: two runs differ ({len(found)} then {len(again)} boxes): "
                "the model is not deterministic here"
            )
        r = match_detections(
            g.detections[i], found, thresholds, m.labels, min_iou=min_iou, atol=spec.atol
        )
        matched, excused, new_below = (
            matched + r.matched,
            excused + r.excused,
            new_below + r.new_below,
        )
        worst_iou, max_diff = min(worst_iou, r.worst_iou), max(max_diff, r.max_score_diff)
        failures += [f"golden input {i}: {f}" for f in r.failures]
    checks.update(
        golden_inputs=int(g.inputs.shape[0]),
        golden_kind=spec.golden_kind,
        golden_boxes=sum(len(d) for d in g.detections),
        matched_boxes=matched,
        excused=excused,
        new_boxes_near_threshold=new_below,
        worst_iou=round(worst_iou, 4),
        min_iou=min_iou,
        max_score_diff=round(max_diff, 6),
        box_failures=len(failures),
    )
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise _Failed(failures[0] + more)


def _detect_latency_ms(model: DetectorModel, x: npt.NDArray[np.generic], runs: int) -> float:
    """Minimum ms per frame (every stage, then decode) over `runs` runs; see _min_latency_ms."""
    detect_input(model, x)  # first run allocates; not timed
    best = math.inf
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        detect_input(model, x)
        best = min(best, (time.perf_counter() - t0) * 1000.0)
    return best


# -- both -----------------------------------------------------------------------------------


def build_model(
    verified: VerifiedBundle, *, threads: int, providers: Sequence[str] | None
) -> Model:
    """The runtime the bundle's task needs: a classifier's StagedModel or a DetectorModel.

    A DetectorModel is built at the bundle's own thresholds; the agent sets its device's
    detect.class_thresholds on the model it runs.
    """
    chosen = list(providers or []) or None
    if verified.manifest.task == "detect":
        return DetectorModel(verified, threads=threads, providers=chosen)
    return StagedModel(verified, threads=threads, providers=chosen)


def _golden_and_probe(
    model: Model, verified: VerifiedBundle, checks: dict[str, CheckValue], notes: list[str]
) -> npt.NDArray[np.generic]:
    """Check the golden outputs (or NaN on zeros when there are none); the latency probe."""
    m = verified.manifest
    dtype = np.dtype(m.input.dtype)
    spec = m.health
    if spec is None:
        zero = np.zeros(_input_shape(m), dtype=dtype)
        if isinstance(model, DetectorModel):
            detect_input(model, zero)
        else:
            _final_probs(model, zero)
        notes.append("no golden inputs")
        return zero
    if isinstance(model, DetectorModel):
        detect_golden = load_detect_golden(verified, spec)
        _check_detect_golden(model, spec, detect_golden, checks)
        return detect_golden.inputs[:1].astype(dtype, copy=False)
    golden = load_golden(verified, spec)
    _check_golden(model, spec, golden, checks)
    return golden.inputs[:1].astype(dtype, copy=False)


def check_health(
    verified: VerifiedBundle,
    *,
    threads: int,
    providers: Sequence[str] | None,
    device_class: str,
    runs: int = 10,
) -> HealthReport:
    """Load the bundle and run its health checks; never raises for a bad bundle."""
    m = verified.manifest
    checks: dict[str, CheckValue] = {"device_class": device_class, "task": m.task}
    try:
        model = build_model(verified, threads=threads, providers=providers)
    except Exception as exc:  # RuntimeLoadError, onnxruntime's own, a bad head file...
        return HealthReport(False, f"does not load: {exc}", checks)
    notes: list[str] = []
    try:
        spec = m.health
        probe = _golden_and_probe(model, verified, checks, notes)
        if isinstance(model, DetectorModel):
            latency = _detect_latency_ms(model, probe, runs)
        else:
            latency = _min_latency_ms(model, probe, runs)
        checks["latency_min_ms"] = round(latency, 3)
        expected = spec.latency_ms.get(device_class) if spec is not None else None
        if expected is None:
            notes.append(f"no latency expectation for class {device_class}")
        else:
            limit = expected * spec.latency_factor if spec is not None else math.inf
            checks.update(latency_expected_ms=expected, latency_limit_ms=round(limit, 3))
            if latency > limit:
                raise _Failed(
                    f"{latency:.2f} ms per frame at best over {runs} runs, more than "
                    f"{limit:.2f} ms ({expected:g} ms measured for {device_class} "
                    f"x {spec.latency_factor if spec else 0:g})"
                )
    except _Failed as exc:
        return HealthReport(False, str(exc), checks)
    except Exception as exc:  # onnxruntime fails at run time on a broken graph
        return HealthReport(False, f"fails to run: {type(exc).__name__}: {exc}", checks)
    reason = "healthy" + (f" ({'; '.join(notes)})" if notes else "")
    return HealthReport(True, reason, checks, model)
