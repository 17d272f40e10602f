"""bench.federated's rounds as plain functions: the learning-rate choice and the central heads.

No coordinator here: the devices' local_update and the coordinator's own fedavg aggregator,
called directly. The choice simulates the rounds for each candidate and keeps the one with
the best accuracy on the devices' validation frames (never the held-out frames reported);
the central heads are the same trainer on every device's examples pooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.federated_data import Device, union
from bench.federated_eval import figures
from bench.federated_local import (
    apply_delta,
    decoded,
    device_update,
    running_bundle,
    takes_part,
    task_for,
)
from bench.report import say
from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.federated.collect import Examples
from edgefleet.agent.federated.local import Budget, local_update
from edgefleet.agent.runtime.confidence import Rule
from edgefleet.server.federated.aggregate import aggregate
from edgefleet.server.federated.spec import RoundSpec


def simulate(
    devices: Sequence[Device],
    base: VerifiedBundle,
    thresholds: Sequence[float | None],
    heads0: Sequence[HeadWeights],
    spec: RoundSpec,
    rounds: int,
) -> list[HeadWeights]:
    """The rounds as plain functions (local_update, fedavg): what the choice is made with."""
    heads = list(heads0)
    exits = list(range(len(heads)))
    for r in range(rounds):
        task = task_for(spec, base, f"choice-{r}", exits)
        running = running_bundle(base, thresholds, dict(enumerate(heads)))
        updates = [device_update(task, running, d) for d in devices if takes_part(task, d)]
        if not updates:
            break
        delta = aggregate("fedavg", [decoded(u) for u in updates], [u.samples for u in updates])
        heads = apply_delta(heads, delta)
    return heads


def choose(
    devices: Sequence[Device],
    base: VerifiedBundle,
    thresholds: Sequence[float | None],
    rules: Sequence[Rule],
    heads0: Sequence[HeadWeights],
    spec: RoundSpec,
    rounds: int,
    grid: Sequence[tuple[float, int]],
) -> tuple[tuple[float, int], list[dict[str, Any]]]:
    """(learning rate, local epochs) with the best accuracy on the validation frames."""
    validation = union([d.validation for d in devices])
    table = []
    for lr, epochs in grid:
        s = spec.model_copy(update={"learning_rate": lr, "local_epochs": epochs})
        f = figures(
            simulate(devices, base, thresholds, heads0, s, rounds), validation, thresholds, rules
        )
        table.append(
            {
                "learning_rate": lr,
                "local_epochs": epochs,
                "val_accuracy": f.accuracy,
                "val_exit_rate": f.exit_rate,
            }
        )
        say(
            f"  choice: lr {lr:g}, {epochs} local epoch(s): validation accuracy "
            f"{f.accuracy:.4f}, exit rate {f.exit_rate:.4f}"
        )
    best = max(table, key=lambda t: (t["val_accuracy"], t["val_exit_rate"]))
    return (float(best["learning_rate"]), int(best["local_epochs"])), table


def central(
    devices: Sequence[Device],
    base: VerifiedBundle,
    thresholds: Sequence[float | None],
    heads0: Sequence[HeadWeights],
    spec: RoundSpec,
    rounds: int,
) -> list[HeadWeights]:
    """local_update on every device's examples pooled, for rounds x local epochs."""
    exits = list(range(len(heads0)))
    s = spec.model_copy(
        update={
            "local_epochs": min(100, rounds * spec.local_epochs),
            "compression": "fp32",
        }
    )
    task = task_for(s, base, "central", exits)
    pooled: dict[int, Examples] = {}
    for h in exits:
        parts = [d.examples([h], task.labels, task.min_confidence)[h] for d in devices]
        parts = [p for p in parts if len(p)]
        pooled[h] = Examples(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.supplied for p in parts]),
        )
    update = local_update(
        task,
        running_bundle(base, thresholds),
        pooled,
        device_id="central",
        budget=Budget(3600.0),
        noise_rng=np.random.default_rng(0),
    )
    return apply_delta(heads0, decoded(update))
