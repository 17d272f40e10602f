"""bench.federated's peer: the same federated task with Flower's FedAvg, when flwr is installed.

Flower's strategy (flwr.server.strategy.FedAvg: sample-weighted averaging of the clients'
weights, aggregate_fit) and its wire format (ndarrays_to_parameters / parameters_to_ndarrays,
FitRes) are driven by a plain loop in this process: no Ray (flwr.simulation needs the
`flwr[simulation]` extra) and no gRPC. Each client is one of the bench's devices and trains
exactly as ours do (the agent's local_update, fp32, on the same pseudo-labelled buffers, from
the global heads Flower sends), so the comparison is the round machinery around the same
trainer: Flower's serialization and averaging against our coordinator's store, validation,
evaluation, signed bundle and rollout.

flwr is not a dependency of the project; where it cannot be imported every figure is None.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.federated import HeadWeights
from edgefleet.server.federated.spec import RoundSpec

from .federated_data import Device
from .federated_local import (
    apply_delta,
    decoded,
    device_update,
    running_bundle,
    takes_part,
    task_for,
)

INSTALL_HINT = (
    "flwr is not importable here, so flower_acc and flower_s_per_round are None: run "
    "`bash deploy/flower-peer.sh` once, then `.venv-flower/bin/python -m bench.federated`. "
    "That virtualenv sees .venv's locked packages and adds flwr 1.42.0 at the versions of "
    "deploy/lock/flower-peer.txt without its pins: no flwr release installs beside "
    "deploy/lock/all.txt without downgrading protobuf below the lock's 7.36 (and others)"
)


def flower_version() -> str | None:
    """flwr's version where it can be imported, else None."""
    if importlib.util.find_spec("flwr") is None:
        return None
    try:
        importlib.import_module("flwr.server.strategy")
    except Exception:  # an install whose dependencies do not import is as good as none
        return None
    return importlib.metadata.version("flwr")


@dataclass(frozen=True)
class FlowerRun:
    """Heads after each round (round 0 first) and each round's wall time."""

    version: str
    heads: list[list[HeadWeights]]
    seconds: list[float]
    clients: list[int]  # clients that trained in each round


def _flat(heads: Sequence[HeadWeights]) -> list[np.ndarray[Any, Any]]:
    return [a for h in heads for a in (h.weight, h.bias)]


def _heads(arrays: Sequence[np.ndarray[Any, Any]]) -> list[HeadWeights]:
    return [
        HeadWeights(np.asarray(arrays[i], np.float32), np.asarray(arrays[i + 1], np.float32))
        for i in range(0, len(arrays), 2)
    ]


def run_flower(
    devices: Sequence[Device],
    base: VerifiedBundle,
    thresholds: Sequence[float | None],
    heads0: Sequence[HeadWeights],
    spec: RoundSpec,
    rounds: int,
    progress: Callable[[str], None] = lambda _m: None,
) -> FlowerRun | None:
    """Flower's FedAvg over the devices for `rounds` rounds; None without flwr."""
    version = flower_version()
    if version is None:
        return None
    common = importlib.import_module("flwr.common")
    strategies = importlib.import_module("flwr.server.strategy")
    strategy = strategies.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        fit_metrics_aggregation_fn=lambda _metrics: {},
        initial_parameters=common.ndarrays_to_parameters(_flat(heads0)),
    )
    fp32 = spec.model_copy(update={"compression": "fp32"})  # Flower sends float32 ndarrays
    exits = list(range(len(heads0)))
    parameters = strategy.initialize_parameters(client_manager=None)
    history = [list(heads0)]
    seconds: list[float] = []
    clients: list[int] = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        task = task_for(fp32, base, f"flower-{rnd}", exits)
        results = []
        for device in devices:
            if not takes_part(task, device):
                continue
            # The client's side: Flower's bytes -> arrays -> local training -> arrays -> bytes.
            global_heads = _heads(common.parameters_to_ndarrays(parameters))
            running = running_bundle(base, thresholds, dict(enumerate(global_heads)))
            update = device_update(task, running, device)
            trained = apply_delta(global_heads, decoded(update))
            res = common.FitRes(
                status=common.Status(code=common.Code.OK, message=""),
                parameters=common.ndarrays_to_parameters(_flat(trained)),
                num_examples=update.samples,
                metrics={},
            )
            results.append((None, res))  # no ClientProxy: FedAvg reads only the FitRes
        aggregated, _ = strategy.aggregate_fit(rnd, results, [])
        if aggregated is not None:
            parameters = aggregated
        seconds.append(time.perf_counter() - t0)
        clients.append(len(results))
        history.append(_heads(common.parameters_to_ndarrays(parameters)))
        progress(f"  flower round {rnd}: {len(results)} clients, {seconds[-1]:.2f} s")
    return FlowerRun(version, history, seconds, clients)
