"""The health check a verified bundle passes before the agent switches to it.

Verification proves a bundle is the one the coordinator signed; this proves it runs here:
it loads with this device's onnxruntime and providers, gives no NaN/inf, reproduces the
optimizer's recorded outputs on the golden inputs (manifest `health`), and is not far slower
than the optimizer measured for this class of device. The StagedModel it built is returned,
so the caller hot-swaps the very sessions that were checked instead of building them again.
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
from edgefleet.agent.runtime.confidence import softmax
from edgefleet.agent.runtime.staged import StagedModel

CheckValue = float | int | bool | str | None
MAX_GOLDEN = 256


@dataclass(frozen=True)
class HealthReport:
    """ok, a one-line reason, flat numbers for an event's details, and the model if it loaded."""

    ok: bool
    reason: str
    checks: dict[str, CheckValue] = field(default_factory=dict)
    model: StagedModel | None = field(default=None, repr=False, compare=False)


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
    checks: dict[str, CheckValue] = {"device_class": device_class}
    try:
        model = StagedModel(verified, threads=threads, providers=list(providers or []) or None)
    except Exception as exc:  # RuntimeLoadError, onnxruntime's own, a bad head file...
        return HealthReport(False, f"does not load: {exc}", checks)
    notes: list[str] = []
    try:
        spec = m.health
        if spec is None:
            zero = np.zeros(_input_shape(m), dtype=np.dtype(m.input.dtype))
            _final_probs(model, zero)
            probe = zero
            notes.append("no golden inputs")
        else:
            golden = load_golden(verified, spec)
            _check_golden(model, spec, golden, checks)
            probe = golden.inputs[:1].astype(np.dtype(m.input.dtype), copy=False)
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
