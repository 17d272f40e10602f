"""Latency of the optimized reference model against fp32 and OpenCV's DNN, side by side.

Every contender runs on the same preprocessed test images through the one interleaved timer
(edgefleet.server.optimize.latency); what is quoted are ratios, the other's time over ours.

Threads are set up as a deployment would: the staged model as the agent loads it (stages on
`threads` intra-op threads, exit branches on one: agent.runtime.session.EXIT_BRANCH_THREADS),
the unsplit fp32 and INT8 models as the agent would run a one-stage bundle of them (one
session on `threads` threads, the same session_options). Every session has its own pool,
spinning off; the staged models' thread counts go to stderr.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from bench.report import say
from bench.runners import cv2_engines, cv2_runner, ort_runner
from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey
from edgefleet.server.optimize.latency import Rounds, Runner, interleaved, medians, round_ratios
from edgefleet.server.optimize.runner import make_session

F32 = npt.NDArray[np.float32]
CHUNK, WARMUP = 25, 20  # images per interleaved chunk; untimed runs per contender first


def staged_runners(out: Path, key: FleetKey, threads: int) -> tuple[Runner, Runner]:
    """The bundle at its default operating point, and with every early exit disabled."""
    verified = verify_bundle(out / "bundle", [key.public])
    default = StagedModel(verified, threads=threads)
    no_exit = StagedModel(verified, threads=threads)
    no_exit.set_thresholds([None] * len(no_exit.early_exits))
    for label, model in (("default point", default), ("exits off", no_exit)):
        stages, branches = model.stage_threads, model.branch_threads
        say(f"  staged ({label}) threads: stages {stages}, exit branches {branches}")
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
    return interleaved(runners, samples, rounds=rounds, chunk=CHUNK, warmup=WARMUP)


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
    int8 = ort_runner(out / "models" / "static.onnx", threads)
    runners = {"int8_ort": int8, "staged": no_exit}
    per_round = interleaved(runners, samples, rounds=rounds, chunk=CHUNK, warmup=WARMUP)
    ratios = [r - 1.0 for r in round_ratios(per_round, "staged", "int8_ort")]
    return {
        "overhead": statistics.median(ratios),
        "round_range": [min(ratios), max(ratios)],
        "rounds": rounds,
        "ms": medians(per_round),
    }


def engine_label(contender: str) -> str:
    """The engine part of an OpenCV contender's name ('default' where OpenCV has no engines)."""
    return contender.removeprefix("fp32_cv2dnn").lstrip("_") or "default"


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
            f"vs_cv2dnn_{engine_label(k)}_engine_speedup": v / lat["int8_exits"]
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
