"""Benchmark detectors: INT8 vs fp32, a peer runtime, third-party models and the motion gate.

Prints one JSON report to stdout (progress goes to stderr) and writes it to --out. Every
latency is measured side by side in this run, 1 thread, batch 1: interleaved rounds, the
median over rounds of each round's mean; what is quoted are ratios (the other's time over
ours, bigger is better).

Sections:
- reference: `edgefleet optimize --task detect` on the reference detector (server/reference/
  detect) with its recorded scene splits and a validation clip for the gate; mAP@0.5 drop
  of INT8 on the test split; fp32 vs INT8 onnxruntime, and the signed bundle as the agent
  runs it (decode, NMS, letterbox mapping) against OpenCV's DNN module running the fp32
  model with the same decode.
- thirdparty: the same command on ddddocr's YOLOX character detector (fixed 416 input,
  opset 11) and nudenet's YOLOv8n (dynamic input dims, opset 17), both out of their PyPI
  wheels, in unlabelled mode: INT8 vs fp32 latency and box agreement (mAP@0.5 of INT8's
  boxes against fp32's taken as truth, test images).
- gated: the agent's own detect pipeline (gate -> model -> tracker) over the reference
  detection video (test-pool digits), every frame vs the bundle's default gate point:
  frames per second flat out, the fraction of frames skipped, recall of the boxes the agent
  reports per frame (a skipped frame reports the last run's) against the video's truth, and
  energy per frame estimated from CPU time (agent/power/estimate.py's x86 profile: the
  dynamic part, (max_w - idle_w) / cores per busy core-second; no power sensor here).

Run from the repository root: `.venv/bin/python -m bench.detect [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.det_data import Maker, Split, char_scenes, face_scenes, write_unlabelled
from bench.det_models import DETECTORS, fetch_detector
from bench.report import (
    Targets,
    emit_report,
    load_avg,
    machine_info,
    report_head,
    rounded_floats,
    say,
    target_check,
)
from bench.runners import cv2_engines
from edgefleet.agent.bundle import VerifiedBundle, verify_bundle
from edgefleet.agent.config import DetectConfig
from edgefleet.agent.detect.decode import decode
from edgefleet.agent.power.estimate import DEFAULT_PROFILE, PROFILES
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.runtime.objects import DetectPipeline
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.datasets import scenes
from edgefleet.server.datasets.clips import write_validation_clip
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.detect.options import DetectOptions
from edgefleet.server.optimize.detect.run import optimize_detector
from edgefleet.server.optimize.gating import FrameObjects, found
from edgefleet.server.optimize.latency import interleaved, medians, ratio_spread
from edgefleet.server.reference import detect as ref
from edgefleet.server.reference.video import read_video

THREADS = 1
CHUNK = 10
# The goals; "max" targets are upper bounds.
TARGETS: Targets = {
    "det_int8_speedup": ("min", 2.0),
    "det_int8_map50_drop_pt": ("max", 1.0),
    "gated_recall_drop_pt": ("max", 1.0),
}
THIRDPARTY_SETS: dict[str, tuple[Maker, dict[Split, tuple[int, int]]]] = {
    "ddddocr_det": (char_scenes, {"calibration": (32, 1), "validation": (40, 2), "test": (40, 3)}),
    "nudenet_320n": (face_scenes, {"calibration": (32, 1), "validation": (40, 2), "test": (40, 3)}),
}


def _quiet(_: str) -> None:
    pass


def _progress(msg: str) -> None:
    say("  " + msg.strip())


def reference_run(work: Path, key: FleetKey) -> tuple[Path, dict[str, Any]]:
    """The optimizer on the reference detector, its scenes and a validation clip."""
    data = work / "scenes.npz"
    say("reference: writing the recorded scene splits")
    scenes.write_npz(data)
    clip, truth = write_validation_clip(work / "val_clip")
    out = work / "reference"
    opts = DetectOptions(
        max_drop=1.0,
        labels=list(ref.LABELS),
        model_id="mnist-det",
        gate_clip=clip,
        gate_truth=truth,
        gate_max_drop=1.0,
    )
    say("reference: edgefleet optimize --task detect (INT8 within 1 mAP point, gate points)")
    report = optimize_detector(
        ref.DET_MODEL_PATH, data, out, ref.preprocessing(), ref.deployed_spec(), key, opts,
        progress=_progress,
    )  # fmt: skip
    return out, report


def _test_inputs(n: int) -> tuple[list[np.ndarray], list[tuple[int, int]], list[np.ndarray]]:
    images, _ = scenes.load_reference_detection("test")
    pre = Preprocessor(ref.preprocessing())
    frames = [images[i] for i in range(min(n, len(images)))]
    return [pre(f) for f in frames], [(int(f.shape[0]), int(f.shape[1])) for f in frames], frames


def reference_latency(out: Path, key: FleetKey, n: int, rounds: int) -> dict[str, Any]:
    """fp32 vs INT8 onnxruntime, and the bundle as the agent runs it vs OpenCV's DNN."""
    import onnxruntime as ort

    from edgefleet.agent.runtime.session import session_options

    verified = verify_bundle(out / "bundle", [key.public])
    model = DetectorModel(verified, threads=THREADS)
    spec, labels = model.spec, list(verified.manifest.labels)
    xs, hws, _ = _test_inputs(n)
    sf = ort.InferenceSession(str(out / "models" / "fp32.onnx"), session_options(THREADS))
    sq = ort.InferenceSession(str(out / "models" / "static.onnx"), session_options(THREADS))
    name = sf.get_inputs()[0].name
    items = list(range(len(xs)))
    cv2.setNumThreads(THREADS)
    engines = cv2_engines()
    engine_name, engine = next(iter(engines.items()))
    net = (
        cv2.dnn.readNetFromONNX(str(out / "models" / "fp32.onnx"))
        if engine is None
        else cv2.dnn.readNetFromONNX(str(out / "models" / "fp32.onnx"), engine)
    )
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    geometry = {hw: model._letterbox(hw) for hw in set(hws)}

    def cv2_with_decode(i: int) -> object:
        net.setInput(xs[i])
        raw = net.forward()
        d = decode([raw], spec, labels, model.input_hw)
        return geometry[hws[i]].detections_to_frame(d) if len(d) else d

    contenders: dict[str, Callable[[int], object]] = {
        "fp32": lambda i: sf.run(None, {name: xs[i]}),
        "int8": lambda i: sq.run(None, {name: xs[i]}),
        "int8_bundle_with_decode": lambda i: model.detect(xs[i], hws[i]),
        "fp32_cv2dnn_with_decode": cv2_with_decode,
    }
    say(f"reference latency: {len(items)} test scenes x {rounds} interleaved rounds, 1 thread")
    per_round = interleaved(contenders, items, rounds=rounds, chunk=CHUNK, warmup=10)
    lat = medians(per_round)
    say("  " + ", ".join(f"{k} {v:.3f} ms" for k, v in lat.items()))

    def ratios(m: dict[str, float]) -> dict[str, float]:
        return {
            "det_int8_speedup": m["fp32"] / m["int8"],
            "vs_cv2dnn_speedup": m["fp32_cv2dnn_with_decode"] / m["int8_bundle_with_decode"],
        }

    return {
        "latency_ms": lat,
        "ratios": ratios(lat),
        "ratio_round_range": ratio_spread(per_round, ratios),
        "cv2dnn_engine": engine_name,
    }


def thirdparty_section(cache: Path, work: Path, key: FleetKey) -> dict[str, Any]:
    """Each third-party detector through the optimizer in unlabelled mode."""
    out: dict[str, Any] = {}
    for name, (make, sizes) in THIRDPARTY_SETS.items():
        det = DETECTORS[name]
        say(f"third-party {name}: {det.wheel} {det.member}")
        model = fetch_detector(name, cache)
        data = write_unlabelled(work / f"{name}.npz", make, sizes)
        opts = DetectOptions(max_drop=1.0, labels=list(det.labels), model_id=name)
        report = optimize_detector(
            model, data, work / name, det.preprocessing(), det.detection(), key, opts,
            progress=_progress,
        )  # fmt: skip
        test = report["test"]
        out[name] = {
            "wheel": det.wheel,
            "member": det.member,
            "licence": det.licence,
            "family": det.family,
            "input": f"{det.size}x{det.size}"
            + (" (dynamic dims fixed)" if det.dynamic_input else ""),
            "int8_speedup": report["ratios"]["int8_speedup"],
            "latency_ms": report["latency_ms"],
            "agreement_map50": test["agreement_map50"],
            "agreement_map50_95": test["int8"]["map50_95"],
            "detections_fp32": test["detections_fp32"],
            "detections_int8": test["detections_int8"],
            "fp32_nodes_kept": report["quantization"].get("excluded", []),
            "sizes": report["sizes"],
        }
    return out


def _truth() -> list[FrameObjects]:
    doc = json.loads(ref.DET_VIDEO_TRUTH_PATH.read_text())
    return [
        FrameObjects(
            np.array([o["box"] for o in f], np.float32).reshape(-1, 4),
            np.array([o["class"] for o in f], np.int64),
        )
        for f in doc["frames"]
    ]


def _pass(
    verified: VerifiedBundle, frames: np.ndarray, gate: Any
) -> tuple[float, float, list[FrameObjects], int, int]:
    """The agent's pipeline over the video once: wall s, CPU s, reported boxes, runs, starts."""
    model = DetectorModel(verified, threads=THREADS)
    pre = Preprocessor(verified.manifest.preprocessing)
    pipe = DetectPipeline(model, DetectConfig(), gate)
    reported: list[FrameObjects] = []
    last = FrameObjects(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    runs = starts = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for i, frame in enumerate(frames):
        step = pipe.step(frame, i / 30.0, pre)
        if step.ran:
            runs += 1
            last = FrameObjects(step.detections.boxes, step.detections.classes)
            starts += sum(e.kind == "object_start" for e in step.events)
        reported.append(last)
    return time.perf_counter() - t0, time.process_time() - c0, reported, runs, starts


def gated_section(out: Path, key: FleetKey, rounds: int) -> dict[str, Any]:
    """The pipeline over the reference video: every frame vs the default gate point."""
    verified = verify_bundle(out / "bundle", [key.public])
    m = verified.manifest
    point = m.operating_points[m.default_operating_point]
    frames = read_video(ref.DET_VIDEO_PATH)
    truth = _truth()
    total = sum(len(t.boxes) for t in truth)
    profile = PROFILES[DEFAULT_PROFILE]
    watts_per_core = (profile.max_w - profile.idle_w) / (os.cpu_count() or 1)
    contenders = {"always": None, point.name: point.gate}
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    result: dict[str, Any] = {}
    say(f"gated: {len(frames)} video frames x {rounds} interleaved rounds, always vs {point.name}")
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
        for name in order:
            w, c, reported, runs, starts = _pass(verified, frames, contenders[name])
            wall[name].append(w)
            cpu[name].append(c)
            hits = sum(found(t, s) for t, s in zip(truth, reported, strict=True))
            result[name] = {
                "recall": hits / total,
                "skip_fraction": 1 - runs / len(frames),
                "objects_started": starts,
            }
    truth_objects = len(json.loads(ref.DET_VIDEO_TRUTH_PATH.read_text())["objects"])
    for name in contenders:
        fps = len(frames) / float(np.median(wall[name]))
        cpu_per_frame = float(np.median(cpu[name])) / len(frames)
        result[name] |= {
            "fps": fps,
            "cpu_ms_per_frame": cpu_per_frame * 1000,
            "energy_per_frame_mj": cpu_per_frame * watts_per_core * 1000,
        }
    g, a = result[point.name], result["always"]
    say(
        f"  fps {a['fps']:.1f} -> {g['fps']:.1f}, skipped {g['skip_fraction']:.1%}, "
        f"recall {a['recall']:.4f} -> {g['recall']:.4f}"
    )
    return {
        "gated_fps_ratio": g["fps"] / a["fps"],
        "gated_energy_ratio": g["energy_per_frame_mj"] / a["energy_per_frame_mj"],
        "gated_skip_fraction": g["skip_fraction"],
        "gated_recall_drop_pt": (a["recall"] - g["recall"]) * 100,
        "gated": {
            "point": point.name,
            "gate": None if point.gate is None else point.gate.model_dump(),
            "calibrated_on_validation": {
                "skip_fraction": point.skip_fraction,
                "recall": point.val_recall,
            },
            "video": {"frames": len(frames), "truth_boxes": total, "truth_objects": truth_objects},
            "contenders": result,
            "energy_model": f"CPU time x ({profile.max_w} - {profile.idle_w}) W / "
            f"{os.cpu_count()} cores ({profile.name} profile, estimate)",
        },
    }


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section and assemble the JSON report."""
    started = time.monotonic()
    result = report_head("edgefleet detectors (reference mnist_det + ddddocr + nudenet)")
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        work = Path(tmp)
        key, _ = init_key(work / "keys")
        out, report = reference_run(work, key)
        lat = reference_latency(out, key, args.samples, args.rounds)
        test = report["test"]
        drop = 100 * (test["fp32"]["map50"] - test["int8"]["map50"])
        result |= {
            "det_int8_speedup": lat["ratios"]["det_int8_speedup"],
            "det_int8_map50_drop_pt": drop,
        }
        third = {} if args.skip_thirdparty else thirdparty_section(args.cache, work, key)
        main_tp = third.get("ddddocr_det", {})
        result |= {
            "thirdparty_det_int8_speedup": main_tp.get("int8_speedup"),
            "thirdparty_det_agreement_map50": main_tp.get("agreement_map50"),
            "thirdparty_dynamic_det_int8_speedup": third.get("nudenet_320n", {}).get(
                "int8_speedup"
            ),
            "thirdparty_dynamic_det_agreement_map50": third.get("nudenet_320n", {}).get(
                "agreement_map50"
            ),
        }
        gated = gated_section(out, key, args.gated_rounds)
        result |= {k: v for k, v in gated.items() if k != "gated"}
        result["vs_cv2dnn_speedup"] = lat["ratios"]["vs_cv2dnn_speedup"]
        result["reference"] = {
            "test_map": {"fp32": test["fp32"], "int8": test["int8"]},
            "validation_drop_pt": report["budget"]["drop_points"],
            "latency_ms": lat["latency_ms"],
            "ratio_round_range": lat["ratio_round_range"],
            "cv2dnn_engine": lat["cv2dnn_engine"],
            "optimizer_latency_ms": report["latency_ms"],
            "fp32_nodes_kept": report["quantization"].get("excluded", []),
            "sizes": report["sizes"],
            "gate_calibration": report.get("gate"),
            "seconds": report["seconds"],
        }
        result["thirdparty"] = third
        result["gated"] = gated["gated"]
    result["targets"] = {k: {kind: bound} for k, (kind, bound) in TARGETS.items()}
    result["meets"] = target_check(TARGETS, result)
    result["load_avg"]["end"] = load_avg()
    result["machine"] = machine_info()
    result["settings"] = {
        "threads": THREADS,
        "batch": 1,
        "rounds": args.rounds,
        "latency_images": args.samples,
        "gated_rounds": args.gated_rounds,
        "statistic": "median over interleaved rounds of each contender's mean ms per image "
        f"(chunks of {CHUNK}, rotating order); ratios are of medians",
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    rounded: dict[str, Any] = rounded_floats(result)
    return rounded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.detect", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("out/bench/detect.json"))
    p.add_argument("--cache", type=Path, default=Path("out/bench/cache"), help="wheel cache")
    p.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    p.add_argument("--samples", type=int, default=100, help="test scenes timed per round")
    p.add_argument("--gated-rounds", type=int, default=3, help="passes over the video each")
    p.add_argument("--skip-thirdparty", action="store_true", help="reference detector only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Run the benchmark, print the JSON, write it to --out."""
    args = parse_args(argv)
    emit_report(build_report(args), args.out, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
