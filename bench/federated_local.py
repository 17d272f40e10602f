"""bench.federated's device side: the agent's own local_update on a device's buffers, and the
poisoned updates two hostile devices send instead.

A device trains from whatever heads it runs: RunningBundle.read gives the bundle's files with
head files replaced by the heads given (a round's result before it is a bundle, or Flower's
global model), so our rounds, the learning-rate choice and the Flower peer all train through
exactly the same code.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.federated import EncodedArray, HeadWeights, decode_update, encode_update
from edgefleet.agent.federated.local import Budget, RunningBundle, local_update, train_rows
from edgefleet.agent.federated.wire import from_tensors, to_tensors
from edgefleet.agent.protocol import FedTask, FedUpdate
from edgefleet.server.federated.spec import RoundSpec

from .federated_data import Device

F32 = npt.NDArray[np.float32]
Attack = Literal["x100", "sign_flip", "nan"]


def running_bundle(
    verified: VerifiedBundle,
    thresholds: Sequence[float | None],
    heads: Mapping[int, HeadWeights] | None = None,
) -> RunningBundle:
    """What a device runs: the bundle, with early exit k's head file read as heads[k]."""
    m = verified.manifest
    replaced: dict[str, bytes] = {}
    for k, head in (heads or {}).items():
        spec = m.stages[m.early_exits[k]].exit
        assert spec is not None and spec.head_file is not None
        replaced[spec.head_file] = head.to_npz_bytes()

    def read(name: str) -> bytes:
        return replaced[name] if name in replaced else verified.read(name)

    return RunningBundle(m.model_id, m.version, verified.manifest_sha256, m, read, list(thresholds))


def takes_part(task: FedTask, device: Device) -> bool:
    """As the agent's worker decides: enough training examples for every head of the task."""
    data = device.examples(task.heads, task.labels, task.min_confidence)
    return all(train_rows(len(data[h]), task.val_fraction) >= task.min_samples for h in task.heads)


def device_update(task: FedTask, running: RunningBundle, device: Device) -> FedUpdate:
    """The agent's local_update on this device's buffers under the task's label rule."""
    return local_update(
        task,
        running,
        device.examples(task.heads, task.labels, task.min_confidence),
        device_id=device.device_id,
        budget=Budget(task.cpu_budget_s),
        # Seeded per device and round (the agent seeds from the OS): it only drives q8's
        # stochastic rounding and DP noise.
        noise_rng=np.random.default_rng(_seed(task.round_id, device.device_id)),
    )


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "big")


def decoded(update: FedUpdate) -> dict[str, F32]:
    """The update's tensors as float32 arrays, by wire name (exit{k}.weight / .bias)."""
    return decode_update(from_tensors(update.tensors))


def poison(update: FedUpdate, attack: Attack, scheme: str) -> FedUpdate:
    """The honest update turned hostile; every other field is left as the device made it.

    x100 and sign_flip are re-encoded like an honest update (they pass every check but the
    norm bound, and sign_flip passes that too); nan goes out as raw float32 bytes, which the
    agent's encoder would refuse: what a broken or hostile device can still send.
    """
    arrays = decoded(update)
    if attack == "nan":
        encoded = {
            k: EncodedArray("fp32", v.shape, np.full(v.shape, np.nan, "<f4").tobytes(), 0.0, 0.0)
            for k, v in arrays.items()
        }
    else:
        factor = 100.0 if attack == "x100" else -1.0
        scaled = {k: (v * np.float32(factor)).astype(np.float32) for k, v in arrays.items()}
        try:
            encoded = encode_update(scaled, scheme, np.random.default_rng(0))  # type: ignore[arg-type]
        except ValueError:  # beyond fp16's range: the coordinator takes fp32 as well
            encoded = encode_update(scaled, "fp32", np.random.default_rng(0))
    return update.model_copy(update={"tensors": to_tensors(encoded)})


def task_for(spec: RoundSpec, verified: VerifiedBundle, round_id: str, heads: list[int]) -> FedTask:
    """The FedTask the round engine would announce for this spec (for runs without it)."""
    return spec.task(
        round_id,
        model_id=verified.manifest.model_id,
        base_manifest_sha256=verified.manifest_sha256,
        base_version=verified.manifest.version,
        heads=heads,
        now=time.time(),
    )


def apply_delta(heads: Sequence[HeadWeights], delta: Mapping[str, F32]) -> list[HeadWeights]:
    """heads + an aggregated delta (wire names), as the coordinator's candidate does."""
    out = list(heads)
    for k, head in enumerate(heads):
        parts = {p: delta[f"exit{k}.{p}"] for p in ("weight", "bias") if f"exit{k}.{p}" in delta}
        if parts:
            out[k] = head.apply(parts)
    return out
