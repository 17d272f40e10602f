"""Benchmark federated rounds: 10 devices improve the exit heads on their own frames.

Prints progress to stderr and one JSON report last on stdout (also written to --out, with a
plot of exit rate and accuracy per round next to it when matplotlib is installed).

Setup: the reference model through the real optimizer (the INT8 early-exit bundle, two early
exits with head files: bench.rollout's v1). --devices simulated devices (bench.federated_data)
each hold a non-IID share of the reference train split (Dirichlet(--alpha) over devices per
class) seen through their own camera shift (brightness, contrast, blur on the uint8 frame),
every frame probed once at full depth through the bundle's real stages. A device's local
frames feed its agent's FeatureCollector (pseudo labels from the final head, confidence >=
0.9; no true label is ever used for training); its held-out frames (--holdout-fraction) are
where the figures are measured, with true labels, at the bundle's default operating point.

- Choice: the learning rate and local epochs are chosen on the devices' frames of the
  reference *validation* split (same class mix and shift), by a plain simulation of the same
  rounds (local_update + the fedavg aggregator), before anything is measured on held-out
  frames. Nothing else is tuned.
- Our rounds (bench.federated_engine): --rounds rounds of self-distillation through our
  RoundEngine and RolloutEngine on a real SQLite store, archive store and signed bundles, a
  fake broker, every device training with the agent's local_update in this process. Per
  round: exit rate and accuracy of the new bundle on the union of the held-out frames, from
  the real StagedModel (checked against the numeric figures), mean ms per frame in the
  stages actually run, interleaved frame by frame with round 0's bundle (ratio).
- acc_central: the same trainer (local_update, --rounds x local epochs) on every device's
  pseudo-labelled examples pooled.
- Poisoned: the same rounds with the last 2 devices hostile. Robust run (trimmed mean, and
  the median): one device alternates x100 and all-NaN updates (NaN is rejected by the
  engine's validation), the other flips the sign. FedAvg run: x100 and sign flip every round
  (updates that pass validation). Both without a norm bound (max_norm 1e12), so the
  aggregator alone stands between them and the heads.
- Bytes: each update's tensors as sent (the round's compression) against float32, and the
  whole MQTT payload (JSON, base64).
- Flower (bench.federated_peer): the same task with flwr's FedAvg when flwr is importable.
- fps_during_training_ratio (bench.federated_fps): unpaced inference fps while the agent's
  FedWorker trains in its thread / fps around it, in one process.

Run from the repository root: `.venv/bin/python -m bench.federated [--out FILE]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.federated_data import Device, Probed, build_devices, union
from bench.federated_engine import Coordinator, RoundOutcome, base_spec
from bench.federated_eval import (
    Latency,
    bundle_heads,
    figures,
    interleaved_latency,
    warmed,
)
from bench.federated_fps import fps_during_training
from bench.federated_local import (
    Attack,
    device_update,
    poison,
    running_bundle,
    takes_part,
)
from bench.federated_peer import INSTALL_HINT, run_flower
from bench.federated_report import bytes_figures, per_round, plot
from bench.federated_sim import central, choose
from bench.report import emit_report, load_avg, machine_info, report_head, rounded_floats, say
from edgefleet.agent.bundle import VerifiedBundle, verify_bundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.federated.local import RunningBundle
from edgefleet.agent.protocol import FedTask, FedUpdate
from edgefleet.agent.runtime.confidence import Rule
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.federated.spec import RoundSpec
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.reference import MODEL_PATH, load_reference_split, reference_preprocessing

GRID = [(lr, epochs) for lr in (0.05, 0.2, 0.5) for epochs in (1, 3)]
POISONED = 2
NO_BOUND = 1e12


# ---------------------------------------------------------------- the base bundle


def base_bundle(work: Path, key: FleetKey, quick: bool) -> Path:
    """The reference model through the real optimizer (quick: fp32, 400 images per split)."""
    splits = load_reference_split()
    if quick:
        splits = {name: (x[:400], y[:400]) for name, (x, y) in splits.items()}
    write_splits_npz(splits, work / "data.npz")
    options = (
        OptimizeOptions(quantization="none", exit_fractions=[0.25, 0.5], latency_samples=10)
        if quick
        else OptimizeOptions(latency_samples=20)
    )
    t0 = time.monotonic()
    optimize(
        MODEL_PATH,
        work / "data.npz",
        work / "opt",
        reference_preprocessing(),
        key,
        options,
        progress=lambda _m: None,
    )
    say(f"optimizer: base bundle built in {time.monotonic() - t0:.1f} s")
    return work / "opt" / "bundle"


# ---------------------------------------------------------------- rounds through our engine

Schedule = Callable[[str, int], Attack | None]


def honest(_device: str, _round: int) -> Attack | None:
    return None


def contribution(
    devices: Sequence[Device], schedule: Schedule, round_no: int
) -> Callable[[FedTask, RunningBundle], list[FedUpdate]]:
    """Every device that takes part trains; a scheduled attacker sends its poisoned update."""

    def contribute(task: FedTask, running: RunningBundle) -> list[FedUpdate]:
        out = []
        for d in devices:
            if not takes_part(task, d):
                continue
            update = device_update(task, running, d)
            attack = schedule(d.device_id, round_no)
            out.append(update if attack is None else poison(update, attack, task.compression))
        return out

    return contribute


def our_rounds(
    name: str,
    work: Path,
    key: FleetKey,
    base_path: Path,
    devices: Sequence[Device],
    spec: RoundSpec,
    rounds: int,
    thresholds: Sequence[float | None],
    schedule: Schedule,
) -> tuple[list[RoundOutcome], list[list[HeadWeights]]]:
    """--rounds rounds through the coordinator; the outcomes and the heads after each."""
    coordinator = Coordinator(work / name, key, base_path, [d.device_id for d in devices])
    heads = [bundle_heads(coordinator.current)]
    outcomes = []
    for r in range(1, rounds + 1):
        outcome = coordinator.round(
            spec,
            contribution(devices, schedule, r),
            lambda verified: running_bundle(verified, thresholds),
        )
        outcomes.append(outcome)
        heads.append(bundle_heads(outcome.bundle) if outcome.bundle else heads[-1])
        rejected = sum(s == "rejected" for s, _ in outcome.statuses.values())
        say(
            f"  {name} round {r}: {outcome.state} in {outcome.seconds:.2f} s "
            f"(local {outcome.local_s:.2f} s), {len(outcome.updates)} of {outcome.expected} "
            "devices sent updates, "
            f"{rejected} rejected" + ("" if outcome.state == "done" else f": {outcome.reason}")
        )
    return outcomes, heads


def attack_schedules(devices: Sequence[Device]) -> tuple[Schedule, Schedule, list[str]]:
    """(robust run's, FedAvg run's, the hostile devices): the last POISONED devices."""
    hostile = [d.device_id for d in devices[-POISONED:]]

    def robust(device: str, r: int) -> Attack | None:
        if device == hostile[0]:
            return "x100" if r % 2 else "nan"
        return "sign_flip" if device in hostile else None

    def plain(device: str, _r: int) -> Attack | None:
        if device == hostile[0]:
            return "x100"
        return "sign_flip" if device in hostile else None

    return robust, plain, hostile


def poisoned_runs(
    work: Path,
    key: FleetKey,
    base_path: Path,
    devices: Sequence[Device],
    spec: RoundSpec,
    rounds: int,
    holdout: Probed,
    thresholds: Sequence[float | None],
    rules: Sequence[Rule],
) -> dict[str, Any]:
    """The rounds with two hostile devices, under trimmed mean, median and FedAvg."""
    robust, plain, hostile = attack_schedules(devices)
    out: dict[str, Any] = {"hostile_devices": hostile}
    for aggregator, schedule in (("trimmed_mean", robust), ("median", robust), ("fedavg", plain)):
        say(f"our rounds, poisoned ({aggregator}):")
        s = spec.model_copy(update={"aggregator": aggregator, "max_norm": NO_BOUND})
        outcomes, heads = our_rounds(
            f"poisoned-{aggregator}", work, key, base_path, devices, s, rounds, thresholds, schedule
        )
        figs = [figures(h, holdout, thresholds, rules) for h in heads]
        out[aggregator] = {
            "accuracy": [f.accuracy for f in figs],
            "exit_rate": [f.exit_rate for f in figs],
            "state": [o.state for o in outcomes],
            "rejected": [
                {d: why for d, (st, why) in o.statuses.items() if st == "rejected"}
                for o in outcomes
            ],
        }
    return out


def fps_runs(
    args: argparse.Namespace,
    base: VerifiedBundle,
    pre: Preprocessor,
    device: Device,
    thresholds: Sequence[float | None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(unpaced, paced) fps during the worker's training."""
    say("fps during local training:")
    common: dict[str, Any] = {"window_s": args.fps_window, "budget_s": args.fps_budget}
    unpaced = fps_during_training(base, pre, device, thresholds, repeats=args.fps_repeats, **common)
    say(f"  unpaced: fps ratio {unpaced['fps_during_training_ratio']:.3f}")
    paced = fps_during_training(
        base, pre, device, thresholds, repeats=1, hz=args.fps_paced, **common
    )
    say(f"  paced at {args.fps_paced:g} fps: fps ratio {paced['fps_during_training_ratio']:.3f}")
    return unpaced, paced


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Everything measured; the report's figures."""
    key, _ = init_key(work / "keys")
    base_path = base_bundle(work, key, args.quick)
    base = verify_bundle(base_path, [key.public])
    model0 = warmed(base)
    m = base.manifest
    pre = Preprocessor(m.preprocessing, dtype=m.input.dtype)
    thresholds = list(model0.thresholds)
    rules: list[Rule] = [m.stages[s].exit.rule for s in m.early_exits]  # type: ignore[union-attr]
    heads0 = bundle_heads(base)
    splits = load_reference_split()
    t0 = time.monotonic()
    devices = build_devices(
        model0,
        pre,
        splits["train"],
        splits["validation"],
        devices=args.devices,
        alpha=args.alpha,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        frames_per_device=args.frames_per_device,
    )
    holdout = union([d.holdout for d in devices])
    say(
        f"devices: {len(devices)}, {sum(len(d.local) for d in devices)} local and "
        f"{len(holdout)} held-out frames probed in {time.monotonic() - t0:.1f} s"
    )

    spec = base_spec(labels="pseudo", compression=args.compression, min_samples=args.min_samples)
    t0 = time.monotonic()
    grid = GRID if not args.quick else GRID[:1]
    (lr, epochs), table = choose(devices, base, thresholds, rules, heads0, spec, args.rounds, grid)
    spec = spec.model_copy(update={"learning_rate": lr, "local_epochs": epochs})
    say(f"chose lr {lr:g}, {epochs} local epoch(s) in {time.monotonic() - t0:.1f} s")

    say("our rounds, clean (FedAvg):")
    outcomes, heads = our_rounds(
        "clean", work, key, base_path, devices, spec, args.rounds, thresholds, honest
    )
    latencies: list[Latency | None] = []
    t0 = time.monotonic()
    for o in [None, *outcomes]:
        bundle = base if o is None else o.bundle
        latencies.append(
            interleaved_latency(model0, warmed(bundle), pre, holdout, args.latency_passes)
            if bundle is not None
            else None
        )
    say(f"latency measured in {time.monotonic() - t0:.1f} s")
    # A failed round leaves the fleet on the previous version: carry its figures forward.
    for i in range(1, len(latencies)):
        latencies[i] = latencies[i] or latencies[i - 1]
    clean = per_round(outcomes, heads, holdout, thresholds, rules, latencies)

    acc_central = figures(
        central(devices, base, thresholds, heads0, spec, args.rounds), holdout, thresholds, rules
    ).accuracy
    say(f"central: accuracy {acc_central:.4f}")

    poisoned = poisoned_runs(
        work, key, base_path, devices, spec, args.rounds, holdout, thresholds, rules
    )

    say("Flower:")
    flower = run_flower(devices, base, thresholds, heads0, spec, args.rounds, say)
    flower_figs = None
    if flower is not None:
        flower_figs = [figures(h, holdout, thresholds, rules) for h in flower.heads]

    fps, paced = fps_runs(args, base, pre, max(devices, key=lambda d: len(d.local)), thresholds)

    last = clean["accuracy"][-1]
    acc_clean = clean["accuracy_numeric"][-1]
    result: dict[str, Any] = {
        "exit_rate_first": clean["exit_rate"][0],
        "exit_rate_last": clean["exit_rate"][-1],
        "latency_ratio_last_vs_first": clean["latency_ratio"][-1],
        "acc_first": clean["accuracy"][0],
        "acc_last": last,
        "acc_central": acc_central,
        "acc_clean": acc_clean,
        "acc_poisoned_robust": poisoned["trimmed_mean"]["accuracy"][-1],
        "acc_poisoned_median": poisoned["median"]["accuracy"][-1],
        "acc_poisoned_fedavg": poisoned["fedavg"]["accuracy"][-1],
        **bytes_figures(outcomes),
        "compression": args.compression,
        "flower_acc": flower_figs[-1].accuracy if flower_figs else None,
        "flower_s_per_round": statistics.mean(flower.seconds) if flower else None,
        "ours_s_per_round": statistics.mean(o.seconds for o in outcomes),
        "ours_local_s_per_round": statistics.mean(o.local_s for o in outcomes),
        "fps_during_training_ratio": fps["fps_during_training_ratio"],
        "fps_during_training_ratio_paced": paced["fps_during_training_ratio"],
    }
    result["goals"] = {
        "exit_rate_up": result["exit_rate_last"] > result["exit_rate_first"],
        "latency_down": result["latency_ratio_last_vs_first"] < 1.0,
        "acc_within_0.5pt_of_central": abs(acc_clean - acc_central) <= 0.005,
        "robust_within_1pt_of_clean": abs(result["acc_poisoned_robust"] - acc_clean) <= 0.01,
        "fedavg_degrades": result["acc_poisoned_fedavg"] < acc_clean - 0.01,
    }
    result["per_round"] = clean
    result["poisoned"] = poisoned
    result["flower"] = (
        {
            "version": flower.version,
            "accuracy": [f.accuracy for f in flower_figs or []],
            "exit_rate": [f.exit_rate for f in flower_figs or []],
            "seconds": flower.seconds,
            "clients": flower.clients,
            "how": "flwr.server.strategy.FedAvg (aggregate_fit) and flwr.common's Parameters "
            "and FitRes driven by a loop in this process (no Ray, no gRPC); clients train with "
            "local_update in fp32 from the global heads",
        }
        if flower is not None
        else {"version": None, "note": INSTALL_HINT}
    )
    result["choice"] = {
        "learning_rate": lr,
        "local_epochs": epochs,
        "grid": table,
        "on": "the devices' frames of the reference validation split",
    }
    result["fps"] = {"unpaced": fps, "paced": paced}
    result["settings"] = {
        "devices": args.devices,
        "rounds": args.rounds,
        "alpha": args.alpha,
        "holdout_fraction": args.holdout_fraction,
        "holdout_frames": len(holdout),
        "seed": args.seed,
        "thresholds": thresholds,
        "operating_point": m.operating_points[m.default_operating_point].name
        if m.operating_points
        else None,
        "spec": spec.model_dump(mode="json", exclude={"rollout"}),
    }
    result["devices"] = {d.device_id: d.summary(spec.min_confidence) for d in devices}
    lines = {f"poisoned, {k}": poisoned[k]["accuracy"] for k in ("trimmed_mean", "fedavg")}
    if flower_figs:
        lines["Flower FedAvg"] = [f.accuracy for f in flower_figs]
    result["plot"] = plot(args.out.with_suffix(".png"), clean, lines, acc_central)
    return result


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run and assemble the JSON report."""
    started = time.monotonic()
    result = report_head(
        f"federated: {args.devices} devices, {args.rounds} rounds of self-distillation"
        + (" (quick)" if args.quick else "")
    )
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as tmp:
        result |= run(args, Path(tmp))
    result["notes"] = dict(NOTES)
    if result["plot"] is None:
        result["notes"]["plot"] = "matplotlib is not installed: no plot"
    result["load_avg"]["end"] = load_avg()
    result["machine"] = machine_info()
    result["seconds"] = round(time.monotonic() - started, 1)
    rounded: dict[str, Any] = rounded_floats(result)
    return rounded


NOTES: dict[str, str] = {
    "machinery": "our rounds run the real RoundEngine and RolloutEngine on a SQLite store with "
    "real signed bundles and archives, in one process with a fake broker: the task is read "
    "from the fake's retained dict, updates enter through Store.ingest, and an install "
    "command makes the device report the new bundle at once. Devices train with the agent's "
    "local_update on its FeatureCollector's pseudo labels, one after another",
    "accuracy": "held-out frames of every device together, true labels, at the bundle's "
    "default operating point. exit_rate/acc_first/acc_last/per_round.accuracy are the real "
    "StagedModel's answers; *_numeric, acc_clean, acc_central and the poisoned and Flower "
    "figures are the same decision made over the frames' probed features (exact up to "
    "threshold ties)",
    "latency_ratio_last_vs_first": "mean ms per frame in the stages actually run (Prediction."
    "stage_ms), the round's bundle and round 0's on the same held-out frames, alternating "
    "frame by frame, each frame its fastest of --latency-passes passes, on one onnxruntime "
    "thread",
    "acc_central": "local_update on all devices' pseudo-labelled examples pooled, rounds x "
    "local epochs, the chosen learning rate: many more SGD steps than any device takes",
    "poisoned": "max_norm 1e12: without it the engine's default bound (5x the round's median "
    "norm) already drops the x100 updates before aggregation",
    "ours_s_per_round": "create -> done: announce, the devices' local_update one after another "
    "(ours_local_s_per_round), ingest, validation, aggregation, the devices' figures as the "
    "evaluation, the signed version + 1, its archive, its delta and the rollout's creation; "
    "flower_s_per_round: the same local training plus Flower's serialization and FedAvg",
    "devices_sat_out": "a device with fewer than min_samples (32) training examples after its "
    "confidence filter sits out, as the agent's worker decides; its round then closes at the "
    "deadline, reached by moving the engines' clock, not by waiting",
    "repeatability": "the engine draws round ids at random and local_update seeds each device's "
    "split and shuffles from the round id, so two runs differ in the last digits (one or two "
    "held-out frames); the devices, shifts and the choice are fixed by --seed",
    "fps_during_training_ratio": "unpaced (median of --fps-repeats): the inference loop takes "
    "all the CPU it can, and the training thread's numpy holds the GIL between the loop's "
    "onnxruntime calls, so this is what training takes from inference at ~0.3 ms a frame on "
    "this 2-core machine (shared with other work: see load_avg); "
    "fps_during_training_ratio_paced: frames at --fps-paced, a camera's rate, where the "
    "fps.paced p95 latencies show what training costs a frame",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.federated",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("out/bench/federated.json"))
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet skew of class mixes")
    p.add_argument("--holdout-fraction", type=float, default=0.3)
    p.add_argument("--frames-per-device", type=int, default=None, help="cap (default: all)")
    p.add_argument("--min-samples", type=int, default=32)
    p.add_argument("--compression", choices=["fp32", "fp16", "q8"], default="fp16")
    p.add_argument("--latency-passes", type=int, default=3)
    p.add_argument("--fps-window", type=float, default=3.0, help="seconds before and after")
    p.add_argument("--fps-budget", type=float, default=4.0, help="CPU seconds of training")
    p.add_argument("--fps-repeats", type=int, default=2, help="unpaced runs (median)")
    p.add_argument("--fps-paced", type=float, default=30.0, help="camera rate of the paced run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="fp32 bundle from 400 images per split, one choice (for the smoke test)",
    )
    args = p.parse_args(argv)
    if args.devices < POISONED + 2:
        p.error(f"--devices must be at least {POISONED + 2}")
    if not 0.05 <= args.holdout_fraction <= 0.9:
        p.error("--holdout-fraction must be in [0.05, 0.9]")
    return args


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Run the benchmark, print the JSON, write it to --out."""
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    emit_report(build_report(args), args.out, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
