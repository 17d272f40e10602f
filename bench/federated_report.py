"""bench.federated's report pieces: per-round arrays, bytes per update, and the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.federated_data import Probed
from bench.federated_engine import RoundOutcome
from bench.federated_eval import Figures, Latency, figures
from bench.federated_local import decoded
from edgefleet.agent.federated import HeadWeights, encode_update, update_bytes
from edgefleet.agent.runtime.confidence import Rule


def per_round(
    outcomes: Sequence[RoundOutcome],
    heads: Sequence[Sequence[HeadWeights]],
    holdout: Probed,
    thresholds: Sequence[float | None],
    rules: Sequence[Rule],
    latencies: Sequence[Latency | None],
) -> dict[str, list[Any]]:
    """Arrays indexed by round (0: the base bundle) for the report."""
    figs: list[Figures] = [figures(h, holdout, thresholds, rules) for h in heads]
    return {
        "round": list(range(len(heads))),
        "exit_rate": [lat.new_exit_rate if lat else None for lat in latencies],
        "accuracy": [lat.new_accuracy if lat else None for lat in latencies],
        "exit_rate_numeric": [f.exit_rate for f in figs],
        "accuracy_numeric": [f.accuracy for f in figs],
        "exit_shares": [f.exits for f in figs],
        "latency_ms": [lat.new_ms if lat else None for lat in latencies],
        "latency_base_ms": [lat.base_ms if lat else None for lat in latencies],
        "latency_ratio": [lat.ratio if lat else None for lat in latencies],
        "state": [None, *[o.state for o in outcomes]],
        "reason": [None, *[o.reason for o in outcomes]],
        "updates_accepted": [
            None,
            *[sum(s == "accepted" for s, _ in o.statuses.values()) for o in outcomes],
        ],
        "devices_sat_out": [None, *[o.expected - len(o.updates) for o in outcomes]],
        "seconds": [None, *[o.seconds for o in outcomes]],
        "local_s": [None, *[o.local_s for o in outcomes]],
        "delta_bundle_bytes": [None, *[o.delta_bytes for o in outcomes]],
    }


def bytes_figures(outcomes: Sequence[RoundOutcome]) -> dict[str, Any]:
    """Per device and round: encoded tensors, float32, the MQTT payload, and q8 for scale."""
    updates = [u for o in outcomes for u in o.updates]
    q8 = [update_bytes(encode_update(decoded(u), "q8", np.random.default_rng(0))) for u in updates]
    return {
        "bytes_per_device_round": statistics.mean(u.encoded_bytes for u in updates),
        "bytes_per_device_round_uncompressed": statistics.mean(u.raw_bytes for u in updates),
        "message_bytes_per_device_round": statistics.mean(
            b for o in outcomes for b in o.message_bytes
        ),
        "bytes_per_device_round_q8": statistics.mean(q8),
    }


def plot(
    path: Path, clean: dict[str, list[Any]], lines: dict[str, list[float]], acc_central: float
) -> str | None:
    """Exit rate and accuracy per round as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = clean["round"]
    ax1.plot(rounds, clean["exit_rate"], marker="o", label="early-exit rate")
    ax1.plot(rounds, [s[0] for s in clean["exit_shares"]], marker=".", label="exit 0 share")
    ax1.set_xlabel("round")
    ax1.set_title("exit rate (held-out frames, default point)")
    ax1.legend()
    ax2.plot(rounds, clean["accuracy"], marker="o", label="ours, FedAvg (clean)")
    for label, values in lines.items():
        ax2.plot(list(range(len(values))), values, marker=".", label=label)
    ax2.axhline(acc_central, color="grey", linestyle="--", label="central")
    ax2.set_xlabel("round")
    ax2.set_title("accuracy (held-out frames, true labels)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
