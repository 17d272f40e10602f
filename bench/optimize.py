"""Benchmark `edgefleet optimize`: INT8 + early exits against fp32 and a peer runtime.

Prints one JSON report to stdout (progress goes to stderr) and writes it to --out. Every
latency is measured side by side in this run: interleaved rounds, the median over rounds of
each round's mean, batch 1, fixed threads; what is quoted are ratios (the other's time over
ours, bigger is better). Absolute medians are kept as supporting detail only.

Run from the repository root: `.venv/bin/python -m bench.optimize [--out FILE]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed, make_input_shape_fixed

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.latency import Runner, time_runner
from edgefleet.server.optimize.options import OptimizeOptions, cpu_has_vnni, use_reduce_range
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.optimize.prepare import TARGET_OPSET, fold_constant_nodes, name_nodes
from edgefleet.server.optimize.quantize import quantize_qdq
from edgefleet.server.optimize.runner import make_session
from edgefleet.server.reference import MODEL_PATH, load_reference_split, reference_preprocessing

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

THREADS = (1, 2)
# The minimums; "max" targets are upper bounds.
TARGETS: dict[str, tuple[str, float]] = {
    "int8_speedup": ("min", 2.5),
    "int8_size_ratio": ("min", 3.5),
    "int8_acc_drop_pt": ("max", 0.5),
    "exits_speedup": ("min", 4.0),
    "exits_acc_drop_pt": ("max", 1.0),
    "split_overhead": ("max", 0.05),
}

WHEEL = "rapidocr_onnxruntime==1.4.4"
WHEEL_GLOB = "rapidocr_onnxruntime-1.4.4-*.whl"
DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
DET_SIZE = 320  # a multiple of 32, as PP-OCR's resize requires; small enough for 2 cores
DB_THRESH = 0.3  # DBNet's binarisation threshold (rapidocr config `Det.thresh`)
# PP-OCR det preprocessing (rapidocr ch_ppocr_det/utils.py DetPreProcess): BGR as loaded,
# x / 255, mean 0.5, std 0.5, HWC -> CHW. No colour swap: rapidocr feeds BGR.
PPOCR_MEAN, PPOCR_STD = 0.5, 0.5


def say(msg: str) -> None:
    """Progress line on stderr (stdout carries only the JSON)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "vnni": cpu_has_vnni(),
        "reduce_range": use_reduce_range("auto"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }


def load_avg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(v, 2) for v in os.getloadavg()]


# ---------------------------------------------------------------- reference optimizer run


def write_reference_npz(path: Path) -> dict[str, Any]:
    """The reference split as <split>_images / <split>_labels; returns the test split."""
    splits = load_reference_split()
    write_splits_npz(splits, path)
    return {"images": splits["test"][0], "labels": splits["test"][1]}


def run_optimizer(work: Path) -> tuple[Path, FleetKey, dict[str, Any], U8]:
    """optimize() with default options on the reference model; returns out dir, key, report."""
    test = write_reference_npz(work / "reference.npz")
    key, _ = init_key(work / "keys")
    out = work / "opt"
    t0 = time.monotonic()
    report = optimize(
        MODEL_PATH,
        work / "reference.npz",
        out,
        reference_preprocessing(),
        key,
        OptimizeOptions(),
        progress=lambda m: say(f"  {m}"),
    )
    say(f"optimizer finished in {time.monotonic() - t0:.1f} s")
    images: U8 = test["images"]
    return out, key, report, images


def preprocessed(images: U8, n: int) -> list[F32]:
    """The first n test images through the agent's own preprocessing, one (1,1,64,64) each."""
    batch = np.asarray(Preprocessor(reference_preprocessing()).batch(list(images[:n])), np.float32)
    return [batch[i : i + 1] for i in range(batch.shape[0])]


# ---------------------------------------------------------------- latency

Rounds = dict[str, list[float]]  # contender -> mean ms per image, one value per round


def interleaved(
    runners: dict[str, Runner], samples: list[F32], rounds: int, chunk: int, warmup: int
) -> Rounds:
    """Every runner over all samples each round, interleaved chunk by chunk in rotating order.

    Like server.optimize.latency.compare, but a noisy neighbour's burst spreads over all
    contenders (short chunks) and no contender always runs right after the same other one
    (rotation); per-round values are kept so ratios can be paired round by round.
    """
    names = list(runners)
    for run in runners.values():
        for x in samples[:warmup]:
            run(x)
    per_round: Rounds = {k: [] for k in names}
    for r in range(rounds):
        total = dict.fromkeys(names, 0.0)
        for c, start in enumerate(range(0, len(samples), chunk)):
            part = samples[start : start + chunk]
            shift = (r + c) % len(names)
            for name in names[shift:] + names[:shift]:
                total[name] += sum(time_runner(runners[name], part))
        for name in names:
            per_round[name].append(total[name] / len(samples))
    return per_round


def medians(per_round: Rounds) -> dict[str, float]:
    """Median over rounds of each contender's per-round mean ms."""
    return {k: statistics.median(v) for k, v in per_round.items()}


def ratio_spread(
    per_round: Rounds, ratios: Callable[[dict[str, float]], dict[str, float]]
) -> dict[str, list[float]]:
    """[min, max] over rounds of each ratio computed within one round: how noisy it was."""
    n = len(next(iter(per_round.values())))
    each = [ratios({k: v[i] for k, v in per_round.items()}) for i in range(n)]
    return {k: [min(r[k] for r in each), max(r[k] for r in each)] for k in each[0]}


def ort_runner(path: Path, threads: int) -> Runner:
    """A device-configured onnxruntime session on one model file, as a runner."""
    return model_runner(path.read_bytes(), threads)


def model_runner(model: onnx.ModelProto | bytes, threads: int) -> Runner:
    """A device-configured onnxruntime session on an in-memory model, as a runner."""
    sess = make_session(model, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


# OpenCV's own ONNX engines by the names each release gives them: 5.0 has CLASSIC and NEW,
# 5.1 dropped CLASSIC and calls its engine OPENCV; 4.x has no engine argument. ENGINE_AUTO and
# 5.1's ENGINE_ORT may run the model through onnxruntime, which is no peer of onnxruntime.
_CV2_OWN_ENGINES = ("ENGINE_OPENCV", "ENGINE_NEW", "ENGINE_CLASSIC")


def cv2_engines() -> dict[str, int | None]:
    """OpenCV's own DNN engines in the installed OpenCV, by contender name."""
    found = {
        f"fp32_cv2dnn_{name.removeprefix('ENGINE_').lower()}": int(getattr(cv2.dnn, name))
        for name in _CV2_OWN_ENGINES
        if hasattr(cv2.dnn, name)
    }
    return dict(found) if found else {"fp32_cv2dnn": None}


def cv2_runner(path: Path, threads: int, engine: int | None = None) -> Runner:
    """OpenCV's DNN module on the same fp32 model, its own CPU backend."""
    cv2.setNumThreads(threads)  # process-wide; set before every measurement that uses it
    net = (
        cv2.dnn.readNetFromONNX(str(path))
        if engine is None
        else cv2.dnn.readNetFromONNX(str(path), engine)
    )
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

    def run(x: F32) -> object:
        net.setInput(x)
        return net.forward()

    return run


def staged_runners(out: Path, key: FleetKey, threads: int) -> tuple[Runner, Runner]:
    """The bundle at its default operating point, and with every early exit disabled."""
    verified = verify_bundle(out / "bundle", [key.public])
    default = StagedModel(verified, threads=threads)
    no_exit = StagedModel(verified, threads=threads)
    no_exit.set_thresholds([None] * len(no_exit.early_exits))
    return default.predict, no_exit.predict


def stage_chain(models: list[onnx.ModelProto], passes: list[list[str]], threads: int) -> Runner:
    """The stage sessions run back to back with no runtime logic: sessions and tensors only."""
    sessions = [make_session(m, threads) for m in models]
    first = sessions[0].get_inputs()[0].name

    def run(x: F32) -> object:
        feeds: dict[str, Any] = {first: x}
        for sess, names in zip(sessions[:-1], passes, strict=False):
            feeds = dict(zip(names, sess.run(names, feeds), strict=True))
        return sessions[-1].run(None, feeds)

    return run


def split_diagnostics(out: Path, key: FleetKey, threads: int) -> dict[str, Runner]:
    """The stage sessions back to back through plain session.run, with no runtime logic.

    Set against the unsplit session it shows what the extra sessions cost; set against the
    staged runtime, what the runtime adds or (bound buffers instead of run()) saves.
    """
    verified = verify_bundle(out / "bundle", [key.public])
    stages = verified.manifest.stages
    models = [onnx.load_from_string(verified.read(s.file)) for s in stages]
    passes = [list(s.outputs) for s in stages]
    return {"diag_stage_chain": stage_chain(models, passes, threads)}


def reference_latency(
    out: Path, key: FleetKey, samples: list[F32], threads: int, rounds: int
) -> Rounds:
    """Per-round ms per image of every contender, interleaved, at one thread count."""
    default, no_exit = staged_runners(out, key, threads)
    runners: dict[str, Runner] = {
        "fp32_ort": ort_runner(out / "models" / "fp32.onnx", threads),
        "int8_ort": ort_runner(out / "models" / "static.onnx", threads),
        "int8_exits": default,
        "int8_staged_no_exit": no_exit,
        # Every engine of OpenCV's own runs: the peer is quoted at its best.
        **{
            name: cv2_runner(out / "models" / "fp32.onnx", threads, engine)
            for name, engine in cv2_engines().items()
        },
        **split_diagnostics(out, key, threads),
    }
    return interleaved(runners, samples, rounds, chunk=25, warmup=20)


def split_pair(
    out: Path, key: FleetKey, samples: list[F32], threads: int, rounds: int
) -> dict[str, Any]:
    """Staged (every exit disabled) against the unsplit INT8 session, just the two of them.

    The split overhead is a few percent, the size of this machine's noise, so it gets its own
    interleaved run of the two contenders that define it, three times the rounds, and the
    median of per-round ratios. Among all eight contenders of the main run each one's caches
    are cold after every switch, which penalises the three-session model's larger footprint
    (+3-4 points here) in a way a device running only the agent never sees.
    """
    _, no_exit = staged_runners(out, key, threads)
    runners = {"int8_ort": ort_runner(out / "models" / "static.onnx", threads), "staged": no_exit}
    per_round = interleaved(runners, samples, rounds, chunk=25, warmup=20)
    ratios = [s / b - 1.0 for s, b in zip(per_round["staged"], per_round["int8_ort"], strict=True)]
    return {
        "overhead": statistics.median(ratios),
        "round_range": [min(ratios), max(ratios)],
        "rounds": rounds,
        "ms": medians(per_round),
    }


def latency_ratios(lat: dict[str, float]) -> dict[str, float]:
    """Ratios of the benchmark: the other's time over ours (split overhead is a fraction).

    The OpenCV peer counts with its faster engine, so its ratios are not flattered.
    """
    engines = {k: v for k, v in lat.items() if k.startswith("fp32_cv2dnn")}
    peer = min(engines.values())
    return {
        "int8_speedup": lat["fp32_ort"] / lat["int8_ort"],
        "exits_speedup": lat["fp32_ort"] / lat["int8_exits"],
        "split_overhead": lat["int8_staged_no_exit"] / lat["int8_ort"] - 1.0,
        "vs_cv2dnn_speedup": peer / lat["int8_exits"],
        "vs_cv2dnn_fp32_speedup": peer / lat["fp32_ort"],
        **{
            f"vs_cv2dnn_{k.removeprefix('fp32_cv2dnn').lstrip('_') or 'default'}_engine_speedup":
            v / lat["int8_exits"]
            for k, v in engines.items()
        },
    }


def split_breakdown(lat: dict[str, float]) -> dict[str, float]:
    """Split overhead in two parts, each a fraction of the unsplit int8 time (they add up).

    stage_sessions_plain_run: the stage sessions chained through session.run. staged_runtime:
    StagedModel.predict against that chain (bound buffers save, timing and head maths cost).
    """
    base = lat["int8_ort"]
    return {
        "stage_sessions_plain_run": lat["diag_stage_chain"] / base - 1.0,
        "staged_runtime": (lat["int8_staged_no_exit"] - lat["diag_stage_chain"]) / base,
    }


def cv2_agreement(out: Path, samples: list[F32]) -> float:
    """Largest |logit difference| of cv2.dnn vs onnxruntime fp32: the peer computes the same."""
    path = out / "models" / "fp32.onnx"
    ort_run, cv_run = ort_runner(path, 1), cv2_runner(path, 1, next(iter(cv2_engines().values())))
    diffs = [
        float(np.max(np.abs(np.asarray(ort_run(x))[0] - np.asarray(cv_run(x))))) for x in samples
    ]
    return max(diffs)


def exit_counts(out: Path, key: FleetKey, samples: list[F32]) -> list[int]:
    """How many latency samples leave at each exit at the default operating point."""
    model = StagedModel(verify_bundle(out / "bundle", [key.public]), threads=1)
    taken = [model.predict(x).exit_index for x in samples]
    return [taken.count(e) for e in range(len(model.early_exits) + 1)]


# ---------------------------------------------------------------- accuracy and sizes


def accuracy_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Test-split accuracies from report.json and the drops in points (fp32 minus ours)."""
    test = report["test"]
    fp32, q, exits = test["fp32_accuracy"], test["quantized_accuracy"], test["accuracy"]
    return {
        "test_images": test["images"],
        "fp32": fp32,
        "int8": q,
        "int8_exits": exits,
        "int8_acc_drop_pt": 100.0 * (fp32 - q),
        "exits_acc_drop_pt": 100.0 * (fp32 - exits),
    }


def exit_histogram(report: dict[str, Any]) -> dict[str, int]:
    """Test images per exit (early exits by cut tensor, then the final head)."""
    names = [f"after_{c['source']}" for c in report["exits"]["cuts"]] + ["final"]
    n = report["test"]["images"]
    rates = report["test"]["exit_rates"]
    return {name: round(rate * n) for name, rate in zip(names, rates, strict=True)}


def size_figures(out: Path) -> dict[str, Any]:
    """Model bytes on disk: unsplit fp32, unsplit int8, and every file of the signed bundle."""
    fp32 = (out / "models" / "fp32.onnx").stat().st_size
    int8 = (out / "models" / "static.onnx").stat().st_size
    bundle = sum(p.stat().st_size for p in (out / "bundle").rglob("*") if p.is_file())
    return {
        "fp32_bytes": fp32,
        "int8_bytes": int8,
        "bundle_bytes": bundle,
        "int8_size_ratio": fp32 / int8,
    }


def target_check(figures: Mapping[str, Any], suffix: str = "") -> dict[str, bool]:
    """Each target against the figure with the given suffix, where that figure exists."""
    meets: dict[str, bool] = {}
    for name, (kind, bound) in TARGETS.items():
        value = figures.get(name + suffix)
        if value is None:
            continue
        meets[name] = value >= bound if kind == "min" else value <= bound
    return meets


# ---------------------------------------------------------------- third-party detector


def fetch_wheel(cache: Path) -> Path:
    """The rapidocr wheel, downloaded once (no install: it would pull in opencv-python)."""
    found = sorted(cache.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    say(f"downloading {WHEEL} into {cache}")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:  # pip's own message says why (offline, index, ...)
        raise RuntimeError(f"pip download {WHEEL} failed: {done.stderr.strip()[-800:]}")
    found = sorted(cache.glob(WHEEL_GLOB))
    if not found:
        raise FileNotFoundError(f"pip download left no {WHEEL_GLOB} in {cache}")
    return found[0]


def prepare_detector(wheel: Path, size: int) -> tuple[onnx.ModelProto, str, list[str]]:
    """The detector with a fixed (1,3,size,size) input, prepared like the optimizer does.

    prepare_model() insists on a class-vector output, so its steps are applied here one by
    one: fixed dims (symbolic inference fails on dynamic ones), opset 12 -> 17 (old opsets
    can give invalid QDQ graphs), weights from Constant nodes into initializers (or they
    stay fp32), then quant_pre_process.
    """
    with zipfile.ZipFile(wheel) as zf:
        model = onnx.load_from_string(zf.read(DET_MEMBER))
    steps = []
    inp = model.graph.input[0]
    shape = [1, 3, size, size]
    for pos, d in enumerate(inp.type.tensor_type.shape.dim):
        if d.dim_param:
            make_dim_param_fixed(model.graph, d.dim_param, shape[pos])
    make_input_shape_fixed(model.graph, inp.name, shape)
    steps.append(f"fixed input shape to {shape}")
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if opset < TARGET_OPSET:
        model = version_converter.convert_version(model, TARGET_OPSET)
        steps.append(f"converted opset {opset} -> {TARGET_OPSET}")
    steps.append(f"named {name_nodes(model)} nodes")
    steps.append(f"folded {fold_constant_nodes(model)} Constant nodes into initializers")
    with tempfile.TemporaryDirectory(prefix="bench-det-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, src)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        model = onnx.load(dst)
    steps.append("quant_pre_process")
    return model, inp.name, steps


# One string keeps the vocabulary readable (a list literal formats to one word per line).
WORDS = (  # noqa: SIM905
    "invoice total amount date receipt order customer number street city station platform "
    "exit entrance open closed warning caution parking price discount sale fresh bakery "
    "coffee pharmacy hotel office floor room delivery address phone email account balance "
    "battery voltage sensor device serial model version batch lot expiry weight net gross"
).split()
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX_SMALL,
)


def random_text(rng: np.random.Generator) -> str:
    """A label-like phrase: words, numbers, prices, dates, codes."""
    kind = int(rng.integers(5))
    word = str(rng.choice(WORDS))
    if kind == 0:
        return f"{word.capitalize()} {rng.choice(WORDS)}"
    if kind == 1:
        return f"{word.upper()} {int(rng.integers(1, 99999))}"
    if kind == 2:
        return f"{word}: {rng.integers(1, 999)}.{rng.integers(0, 99):02d} EUR"
    if kind == 3:
        return f"{rng.integers(2019, 2026)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    return f"No. {rng.integers(100, 99999)} {word}"


def render_text_image(rng: np.random.Generator, size: int) -> tuple[U8, U8]:
    """A light, slightly noisy BGR image with a few lines of dark text; and its word-box mask."""
    bg = np.empty((size, size, 3), np.float32)
    bg[:] = rng.integers(185, 256, size=3)
    # A gentle illumination gradient, as on a photographed label.
    ramp = np.linspace(-rng.uniform(0, 20), rng.uniform(0, 20), size, dtype=np.float32)
    bg += ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    img = np.clip(bg, 0, 255).astype(np.uint8)  # OpenCV 5's putText draws on 8-bit images only
    mask = np.zeros((size, size), np.uint8)
    y = int(rng.integers(8, 30))
    while True:
        font = int(rng.choice(FONTS))
        scale = float(rng.uniform(0.6, 1.3))
        thick = int(rng.integers(1, 3))
        text = random_text(rng)
        (w, h), base_line = cv2.getTextSize(text, font, scale, thick)
        if w >= size - 8:
            continue  # too wide for the image: draw another phrase
        y += h + int(rng.integers(6, 26))
        if y + base_line >= size - 4:
            break
        x = int(rng.integers(4, size - w - 3))
        color = tuple(int(c) for c in rng.integers(0, 90, size=3))
        cv2.putText(img, text, (x, y), font, scale, color, thick, cv2.LINE_AA)
        mask[max(y - h, 0) : y + base_line, x : x + w] = 1
    if rng.random() < 0.5:
        img = np.asarray(cv2.GaussianBlur(img, (3, 3), 0), np.uint8)
    noisy = img + rng.normal(0.0, rng.uniform(2.0, 7.0), img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), mask


def ppocr_input(img: U8) -> F32:
    """PP-OCR det preprocessing of one BGR image already at a multiple of 32."""
    x = (img.astype(np.float32) / 255.0 - PPOCR_MEAN) / PPOCR_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def text_set(n: int, seed: int, size: int) -> tuple[F32, list[U8]]:
    """n rendered images (preprocessed, stacked) and their word-box masks."""
    rng = np.random.default_rng(seed)
    pairs = [render_text_image(rng, size) for _ in range(n)]
    x = np.concatenate([ppocr_input(img) for img, _ in pairs]).astype(np.float32)
    return x, [m for _, m in pairs]


def iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    """Intersection over union of two masks (1.0 when both are empty)."""
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def map_agreement(p32: F32, p8: F32, boxes: list[U8]) -> dict[str, float]:
    """How far the int8 probability maps are from fp32's, and both from the rendered words."""
    b32, b8 = p32 > DB_THRESH, p8 > DB_THRESH
    truth = [m.astype(bool) for m in boxes]
    return {
        "pixel_agreement": float(np.mean(b32 == b8)),
        "mean_abs_diff": float(np.mean(np.abs(p32 - p8))),
        "max_abs_diff": float(np.max(np.abs(p32 - p8))),
        "mask_iou_int8_vs_fp32": float(np.mean([iou(a, b) for a, b in zip(b32, b8, strict=True)])),
        "fp32_text_fraction": float(b32.mean()),
        "int8_text_fraction": float(b8.mean()),
        # Sanity that the rendered images are text to this detector: overlap with word boxes.
        "fp32_iou_vs_word_boxes": float(
            np.mean([iou(a, t) for a, t in zip(b32, truth, strict=True)])
        ),
        "int8_iou_vs_word_boxes": float(
            np.mean([iou(a, t) for a, t in zip(b8, truth, strict=True)])
        ),
    }


def prob_maps(model: onnx.ModelProto, x: F32) -> F32:
    """The detector's (N, H, W) probability maps, batch 1 as on a device."""
    sess = make_session(model, 1)
    name = sess.get_inputs()[0].name
    maps = [np.asarray(sess.run(None, {name: x[i : i + 1]})[0]) for i in range(x.shape[0])]
    return np.concatenate(maps).reshape(x.shape[0], x.shape[2], x.shape[3]).astype(np.float32)


def thirdparty(cache: Path, rounds: int, n_timed: int) -> dict[str, Any]:
    """PP-OCRv4 det from its PyPI wheel, static INT8 without exits: latency and agreement."""
    wheel = fetch_wheel(cache)
    fp32, input_name, steps = prepare_detector(wheel, DET_SIZE)
    calib, _ = text_set(64, seed=1, size=DET_SIZE)
    evals, boxes = text_set(64, seed=2, size=DET_SIZE)
    rr = use_reduce_range("auto")
    say(f"third-party: calibrating PP-OCRv4 det on {calib.shape[0]} rendered images")
    int8 = quantize_qdq(fp32, input_name, calib, reduce_range=rr)
    say("third-party: output agreement on 64 other rendered images")
    agreement = map_agreement(prob_maps(fp32, evals), prob_maps(int8, evals), boxes)
    samples = [evals[i : i + 1] for i in range(n_timed)]
    latency: dict[str, dict[str, float]] = {}
    spread: dict[str, list[float]] = {}
    for threads in THREADS:
        say(f"third-party: latency, {threads} thread(s)")
        runners = {"fp32_ort": model_runner(fp32, threads), "int8_ort": model_runner(int8, threads)}
        # Few warm-up runs: each costs tens of ms, and the first already pays the allocations.
        per_round = interleaved(runners, samples, rounds, chunk=4, warmup=3)
        latency[f"{threads}t"] = medians(per_round)
        spread[f"{threads}t"] = ratio_spread(per_round, detector_speedup)["speedup"]
    return {
        "model": f"{WHEEL} {DET_MEMBER} (PP-OCRv4 det, DBNet; Apache-2.0)",
        "input_shape": [1, 3, DET_SIZE, DET_SIZE],
        "prepared": steps,
        "quantization": {"mode": "static QDQ, per-channel, minmax", "reduce_range": rr},
        "calibration_images": int(calib.shape[0]),
        "eval_images": int(evals.shape[0]),
        "timed_images": n_timed,
        "fp32_bytes": len(fp32.SerializeToString()),
        "int8_bytes": len(int8.SerializeToString()),
        "agreement": agreement,
        "latency_ms": latency,
        "speedup": {k: detector_speedup(v)["speedup"] for k, v in latency.items()},
        "speedup_round_range": spread,
    }


def detector_speedup(lat: dict[str, float]) -> dict[str, float]:
    """fp32 time over int8 time."""
    return {"speedup": lat["fp32_ort"] / lat["int8_ort"]}


def thirdparty_safely(cache: Path, rounds: int, n_timed: int) -> dict[str, Any]:
    """The third-party section, or its error: it must not sink the rest of the benchmark."""
    try:
        detail = thirdparty(cache, rounds, n_timed)
    except Exception as exc:  # any failure here is reported, not raised
        say(f"third-party path failed: {exc}")
        return {
            "thirdparty_error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
            "thirdparty_int8_speedup": None,
            "thirdparty_int8_speedup_2t": None,
        }
    return {
        "thirdparty": detail,
        "thirdparty_int8_speedup": detail["speedup"]["1t"],
        "thirdparty_int8_speedup_2t": detail["speedup"]["2t"],
    }


# ---------------------------------------------------------------- report


def reference_section(
    work: Path, samples_n: int, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer run plus latency at each thread count; returns (top-level figures, detail)."""
    out, key, report, test_images = run_optimizer(work)
    samples = preprocessed(test_images, samples_n)
    lat: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, list[float]]] = {}
    figures: dict[str, Any] = {}
    split: dict[str, dict[str, Any]] = {}
    for threads in THREADS:
        say(f"latency: {len(samples)} test images x {rounds} interleaved rounds, {threads}t")
        per_round = reference_latency(out, key, samples, threads, rounds)
        lat[f"{threads}t"] = medians(per_round)
        spread[f"{threads}t"] = ratio_spread(per_round, latency_ratios)
        suffix = "" if threads == 1 else f"_{threads}t"
        for name, value in latency_ratios(lat[f"{threads}t"]).items():
            figures[name + suffix] = value
        say("  " + ", ".join(f"{k} {v:.3f} ms" for k, v in lat[f"{threads}t"].items()))
        pair = split_pair(out, key, samples, threads, 3 * rounds)
        split[f"{threads}t"] = pair | {"in_full_rotation": figures["split_overhead" + suffix]}
        figures["split_overhead" + suffix] = pair["overhead"]
        say(f"  split overhead, pairwise: {pair['overhead']:.3f} (rounds {pair['round_range']})")
    acc = accuracy_figures(report)
    sizes = size_figures(out)
    figures |= {
        "int8_size_ratio": sizes["int8_size_ratio"],
        "int8_acc_drop_pt": acc["int8_acc_drop_pt"],
        "exits_acc_drop_pt": acc["exits_acc_drop_pt"],
    }
    detail = {
        "latency_ms": lat,
        "ratio_round_range": spread,
        "split_overhead_pairwise": split,
        "split_overhead_breakdown": {k: split_breakdown(v) for k, v in lat.items()},
        "accuracy": acc,
        "exit_histogram": exit_histogram(report),
        "latency_samples_exit_counts": exit_counts(out, key, samples),
        "sizes": sizes,
        "cv2dnn_max_abs_logit_diff": cv2_agreement(out, samples[:20]),
        "optimizer": {
            "seconds": report["seconds"],
            "quantization": {
                k: report["quantization"].get(k)
                for k in ("mode", "method", "reduce_range", "per_channel", "excluded")
            },
            "exit_cuts": report["exits"]["cuts"],
            "default_operating_point": report["exits"]["default"],
            "test_mean_macs_fraction": report["test"]["mean_macs_fraction"],
            "own_latency_ratios_1t": report["ratios"],
        },
    }
    return figures, detail


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section and assemble the JSON report."""
    started = time.monotonic()
    result: dict[str, Any] = {
        "benchmark": "edgefleet optimize (reference mnist_cnn + third-party PP-OCRv4 det)",
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_avg": {"start": load_avg()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        figures, detail = reference_section(Path(tmp), args.samples, args.rounds)
    result |= figures
    if args.skip_thirdparty:
        result |= {"thirdparty_int8_speedup": None, "thirdparty_int8_speedup_2t": None}
    else:
        result |= thirdparty_safely(args.cache, args.rounds, args.thirdparty_timed)
    result |= detail
    result["targets"] = {k: {kind: bound} for k, (kind, bound) in TARGETS.items()}
    result["meets"] = target_check(result)
    result["meets_2t"] = target_check(result, "_2t")
    result["load_avg"]["end"] = load_avg()
    result["machine"] = machine_info()
    result["settings"] = {
        "batch": 1,
        "threads": list(THREADS),
        "rounds": args.rounds,
        "latency_images": args.samples,
        "statistic": "median over rounds of each round's mean ms per image; rounds interleave "
        "contenders in chunks of 25 images (detector: 4) in rotating order; ratios are of "
        "medians, *_round_range gives [min, max] of the same ratio within single rounds; "
        "split_overhead comes from its own two-contender run (split_overhead_pairwise: "
        "3x the rounds, median of per-round ratios)",
        "optimizer_options": OptimizeOptions().model_dump(),
        "session_options": "agent.runtime.session.session_options(threads): spinning off",
        "cv2dnn": "readNetFromONNX(models/fp32.onnx[, each of OpenCV's own engines]), "
        "DNN_BACKEND_OPENCV, setNumThreads(threads); vs_cv2dnn_speedup uses the fastest engine",
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    rounded: dict[str, Any] = rounded_floats(result)
    return rounded


def rounded_floats(value: Any, digits: int = 5) -> Any:
    """Floats to a few significant digits, so the report reads without noise digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded_floats(v, digits) for v in value]
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.optimize", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("out/bench/optimize.json"))
    p.add_argument("--cache", type=Path, default=Path("out/bench/cache"), help="wheel cache")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per latency")
    p.add_argument("--samples", type=int, default=200, help="test images timed per round")
    p.add_argument(
        "--thirdparty-timed", type=int, default=16, help="detector images timed per round"
    )
    p.add_argument("--skip-thirdparty", action="store_true", help="reference model only")
    return p.parse_args(argv)


def emit_report(result: dict[str, Any], out: Path, emit: Callable[[str], None]) -> None:
    """Print the JSON report and write the same text to out."""
    text = json.dumps(result, indent=2, sort_keys=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    emit(text)
    say(f"written to {out}")


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Run the benchmark, print the JSON, write it to --out."""
    args = parse_args(argv)
    emit_report(build_report(args), args.out, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
