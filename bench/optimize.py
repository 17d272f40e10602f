"""Benchmark `edgefleet optimize`: INT8 + early exits against fp32 and a peer runtime.

Prints one JSON report to stdout (progress goes to stderr) and writes it to --out. Every
latency is measured side by side in this run: interleaved rounds, the median over rounds of
each round's mean, batch 1, fixed threads; what is quoted are ratios (the other's time over
ours, bigger is better). Absolute medians are kept as supporting detail only.

The reference model's figures come from bench.reference_latency and the accuracy and sizes
below. Unless --skip-thirdparty, the report also carries the third-party detector's figures
(`thirdparty_int8_speedup`, `thirdparty`), run by bench.thirdparty's own section after the
reference model; `python -m bench.thirdparty` runs that section alone.

Run from the repository root: `.venv/bin/python -m bench.optimize [--skip-thirdparty]
[--out FILE]`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.reference_bundle import preprocessed, run_optimizer
from bench.reference_latency import (
    CHUNK,
    cv2_agreement,
    exit_counts,
    latency_ratios,
    reference_latency,
    split_breakdown,
    split_pair,
)
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
from bench.thirdparty import CHUNK as DETECTOR_CHUNK
from bench.thirdparty import thirdparty_section
from edgefleet.server.optimize.latency import medians, ratio_spread
from edgefleet.server.optimize.options import OptimizeOptions

THREADS = (1, 2)
# The minimums; "max" targets are upper bounds.
TARGETS: Targets = {
    "int8_speedup": ("min", 2.5),
    "int8_size_ratio": ("min", 3.5),
    "int8_acc_drop_pt": ("max", 0.5),
    "exits_speedup": ("min", 4.0),
    "exits_acc_drop_pt": ("max", 1.0),
    "split_overhead": ("max", 0.05),
}


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
            "budget": report["budget"],
            "certified_sets": report["exits"].get("certification", {})
            and {k: report["exits"]["certification"][k] for k in ("tested", "certified")},
            "speed_control": {
                k: report["quantization"].get("speed", {}).get(k)
                for k in ("speed_excluded", "kept")
            },
        },
    }
    return figures, detail


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section and assemble the JSON report."""
    started = time.monotonic()
    result = report_head("edgefleet optimize (reference mnist_cnn + third-party PP-OCRv4 det)")
    with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
        figures, detail = reference_section(Path(tmp), args.samples, args.rounds)
    result |= figures
    if args.skip_thirdparty:
        result |= {"thirdparty_int8_speedup": None, "thirdparty_int8_speedup_2t": None}
    else:
        result |= thirdparty_section(args.cache, args.rounds, args.thirdparty_timed)
    result |= detail
    result["targets"] = {k: {kind: bound} for k, (kind, bound) in TARGETS.items()}
    result["meets"] = target_check(TARGETS, result)
    result["meets_2t"] = target_check(TARGETS, result, "_2t")
    result["load_avg"]["end"] = load_avg()
    result["machine"] = machine_info()
    result["settings"] = {
        "batch": 1,
        "threads": list(THREADS),
        "rounds": args.rounds,
        "latency_images": args.samples,
        "statistic": "median over rounds of each round's mean ms per image; rounds interleave "
        f"contenders in chunks of {CHUNK} images (detector: {DETECTOR_CHUNK}) in rotating "
        "order; ratios are of medians, *_round_range gives [min, max] of the same ratio within "
        "single rounds; split_overhead comes from its own two-contender run "
        "(split_overhead_pairwise: 3x the rounds, median of per-round ratios)",
        "optimizer_options": OptimizeOptions().model_dump(),
        "session_options": "agent.runtime.session.session_options(n): spinning off, one "
        "intra-op pool per session; n = threads for every stage and unsplit contender, 1 for "
        "exit branch graphs (EXIT_BRANCH_THREADS), as the agent loads a bundle",
        "cv2dnn": "readNetFromONNX(models/fp32.onnx[, each of OpenCV's own engines]), "
        "DNN_BACKEND_OPENCV, setNumThreads(threads); vs_cv2dnn_speedup uses the fastest engine",
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    rounded: dict[str, Any] = rounded_floats(result)
    return rounded


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


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Run the benchmark, print the JSON, write it to --out."""
    args = parse_args(argv)
    emit_report(build_report(args), args.out, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
