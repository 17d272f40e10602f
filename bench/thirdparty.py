"""Benchmark `edgefleet optimize`'s quantizer on a third-party model: PP-OCRv4's text detector.

The detector comes from its PyPI wheel (rapidocr_onnxruntime, Apache-2.0; downloaded once into
--cache with `pip download`, never installed), is quantized to static INT8 (no exits: it is a
dense-prediction model) by the optimizer's own steps, and is timed against its fp32 self at 1
and 2 threads with the interleaved timer of edgefleet.server.optimize.latency (chunks of 4
images in rotating order, median over rounds of each round's mean). The INT8 probability maps
are compared with fp32's and with the word boxes of the rendered images (bench.text_images).

Run from the repository root: `.venv/bin/python -m bench.thirdparty [--out FILE]`; the JSON
report is printed last (progress goes to stderr) and written to --out. `python -m
bench.optimize` runs the same section after the reference model unless --skip-thirdparty.
A failure (no network for the wheel, say) is reported in the JSON as `thirdparty_error`, and
this module then exits 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed, make_input_shape_fixed

from bench import zoo_models
from bench.report import emit_report, load_avg, machine_info, report_head, rounded_floats, say
from bench.runners import model_runner
from bench.text_images import render_text_image
from edgefleet.server.optimize.latency import interleaved, medians, ratio_spread
from edgefleet.server.optimize.options import use_reduce_range
from edgefleet.server.optimize.prepare import TARGET_OPSET, fold_constant_nodes, name_nodes
from edgefleet.server.optimize.quantize import quantize_qdq
from edgefleet.server.optimize.runner import make_session

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

THREADS = (1, 2)
WHEEL = "rapidocr_onnxruntime==1.4.4"
WHEEL_GLOB = "rapidocr_onnxruntime-1.4.4-*.whl"
DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
DET_SIZE = 320  # a multiple of 32, as PP-OCR's resize requires; small enough for 2 cores
DB_THRESH = 0.3  # DBNet's binarisation threshold (rapidocr config `Det.thresh`)
# PP-OCR det preprocessing (rapidocr ch_ppocr_det/utils.py DetPreProcess): BGR as loaded,
# x / 255, mean 0.5, std 0.5, HWC -> CHW. No colour swap: rapidocr feeds BGR.
PPOCR_MEAN, PPOCR_STD = 0.5, 0.5
# Few warm-up runs: each costs tens of ms, and the first already pays the allocations.
CHUNK, WARMUP = 4, 3


def fetch_wheel(cache: Path) -> Path:
    """The rapidocr wheel, downloaded once (no install: it would pull in opencv-python)."""
    return zoo_models.fetch_wheel(WHEEL, cache)


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


def detector_figures(cache: Path, rounds: int, n_timed: int) -> dict[str, Any]:
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
        per_round = interleaved(runners, samples, rounds=rounds, chunk=CHUNK, warmup=WARMUP)
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


def thirdparty_section(cache: Path, rounds: int, n_timed: int) -> dict[str, Any]:
    """The third-party figures, or its error: it must not sink a combined benchmark."""
    try:
        detail = detector_figures(cache, rounds, n_timed)
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


STATISTIC = (
    "median over rounds of each round's mean ms per image; rounds interleave fp32 and int8 in "
    f"chunks of {CHUNK} images in rotating order; speedup is fp32 / int8 of those medians, "
    "speedup_round_range gives [min, max] of the same ratio within single rounds"
)


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the third-party section and assemble the JSON report."""
    started = time.monotonic()
    result = report_head(f"edgefleet optimize on a third-party model ({WHEEL}, PP-OCRv4 det)")
    result |= thirdparty_section(args.cache, args.rounds, args.timed)
    result["load_avg"]["end"] = load_avg()
    result["machine"] = machine_info()
    result["settings"] = {
        "batch": 1,
        "threads": list(THREADS),
        "rounds": args.rounds,
        "timed_images": args.timed,
        "statistic": STATISTIC,
        "session_options": "agent.runtime.session.session_options(threads): spinning off",
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    rounded: dict[str, Any] = rounded_floats(result)
    return rounded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.thirdparty", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("out/bench/thirdparty.json"))
    p.add_argument("--cache", type=Path, default=Path("out/bench/cache"), help="wheel cache")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per latency")
    p.add_argument("--timed", type=int, default=16, help="detector images timed per round")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Run the benchmark, print the JSON, write it to --out; 1 if the section failed."""
    args = parse_args(argv)
    result = build_report(args)
    emit_report(result, args.out, emit)
    return 1 if "thirdparty_error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
