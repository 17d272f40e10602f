"""One device's update for a round, from its examples to the message: pure, no threads or I/O.

Which device takes part (check_eligible), the base head from the running bundle, a split of
the device's examples into training and validation, train_head per exit within a shared CPU
budget, validation accuracy and exit rate before and after, the delta, clipping and noise,
compression, and the FedUpdate with every figure filled in (local_update). The worker thread
(worker.py) only orchestrates this.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.bundle.manifest import Manifest
from edgefleet.agent.protocol import FedTask, FedUpdate, sampled

from .buffer import split
from .collect import Examples
from .compress import encode_update, raw_bytes, update_bytes
from .privacy import add_gaussian_noise, clip_update, update_norm
from .softmax import HeadWeights, evaluate, train_head
from .wire import flatten_heads, to_tensors


class SitOut(Exception):
    """The device does not take part in a round; reason is a short machine-readable word."""

    def __init__(self, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.details = details


@dataclass(frozen=True, eq=False)
class RunningBundle:
    """What the device runs, as the worker needs it (read on its own thread)."""

    model_id: str
    version: int
    manifest_sha256: str
    manifest: Manifest
    read: Callable[[str], bytes]  # a bundle file, hash-checked (VerifiedBundle.read)
    thresholds: Sequence[float | None]  # the current operating point's, per early exit


def base_head(running: RunningBundle, head: int) -> HeadWeights:
    """Early exit `head`'s weights in the running bundle; SitOut when it has none to train."""
    m = running.manifest
    if head >= len(m.early_exits):
        raise SitOut(
            "head_unavailable",
            f"the bundle has {len(m.early_exits)} early exit(s), the round trains exit {head}",
            head=head,
        )
    spec = m.stages[m.early_exits[head]].exit
    if spec is None or spec.head_file is None:
        raise SitOut(
            "head_unavailable", f"exit {head} has no head weights file to train", head=head
        )
    return HeadWeights.from_npz_bytes(running.read(spec.head_file))


def train_rows(n: int, val_fraction: float) -> int:
    """How many of n examples train (split() keeps round(n * f), never all, for validation)."""
    return n - min(round(n * val_fraction), max(n - 1, 0))


def _split(ex: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples]:
    # The supplied flag rides along as an extra column so split() stays the one definition
    # of the split; the same seed for every head splits the same frames the same way.
    joined = np.hstack([ex.x, ex.supplied[:, None].astype(np.float32)])
    xt, yt, xv, yv = split(joined, ex.y, val_fraction, np.random.default_rng(seed))
    return (
        Examples(np.ascontiguousarray(xt[:, :-1]), yt, xt[:, -1] > 0.5),
        Examples(np.ascontiguousarray(xv[:, :-1]), yv, xv[:, -1] > 0.5),
    )


def exit_rate(head: HeadWeights, x: np.ndarray, threshold: float | None) -> float | None:
    """Share of examples whose top softmax probability reaches the exit's threshold."""
    if threshold is None or x.shape[0] == 0:
        return None
    z = x.astype(np.float64) @ head.weight.T.astype(np.float64) + head.bias
    z -= z.max(axis=1, keepdims=True)
    top = 1.0 / np.exp(z).sum(axis=1)
    return float((top >= threshold).mean())


def _weighted(values: Sequence[tuple[float | None, int]]) -> float | None:
    kept = [(v, n) for v, n in values if v is not None and n > 0]
    total = sum(n for _, n in kept)
    if not total:
        return None
    return min(1.0, max(0.0, sum(v * n for v, n in kept) / total))


@dataclass(frozen=True)
class Budget:
    """CPU seconds for a whole round and the clock that measures them (one thread's)."""

    seconds: float
    clock: Callable[[], float] = time.thread_time


def local_update(
    task: FedTask,
    running: RunningBundle,
    data: dict[int, Examples],
    *,
    device_id: str,
    budget: Budget,
    noise_rng: np.random.Generator,
    now: Callable[[], float] = time.time,
) -> FedUpdate:
    """Train every head the task names from the running bundle's weights; the update.

    data[h] holds exit h's examples under the task's label rule. The CPU budget is shared
    out in order: head i must be done by start + budget * (i + 1) / heads, so a head that
    finishes early leaves its time to the next. Validation figures are on the device's own
    held-out split, weighted by each head's validation examples.
    """
    cpu0 = budget.clock()
    digest = hashlib.sha256(f"{task.round_id}/{device_id}".encode()).digest()
    seed = int.from_bytes(digest[:8], "big")  # the same split after a restart
    deltas: dict[int, dict[str, np.ndarray]] = {}
    train_n: list[int] = []
    supplied_n: list[int] = []
    val_n: list[int] = []
    acc_before: list[tuple[float | None, int]] = []
    acc_after: list[tuple[float | None, int]] = []
    rate_before: list[tuple[float | None, int]] = []
    rate_after: list[tuple[float | None, int]] = []
    losses: list[tuple[float | None, int]] = []
    epochs: list[float] = []
    stopped = False
    for i, head in enumerate(task.heads):
        base = base_head(running, head)
        fit, val = _split(data[head], task.val_fraction, seed)
        result = train_head(
            base,
            fit.x,
            fit.y,
            epochs=task.local_epochs,
            lr=task.learning_rate,
            batch_size=task.batch_size,
            weight_decay=task.weight_decay,
            prox_mu=task.prox_mu,
            rng=np.random.default_rng(seed + 1 + head),
            deadline=cpu0 + budget.seconds * (i + 1) / len(task.heads),
            clock=budget.clock,
        )
        deltas[head] = result.head.delta(base)
        n = len(fit)
        train_n.append(n)
        supplied_n.append(int(fit.supplied.sum()))
        val_n.append(len(val))
        threshold = running.thresholds[head] if head < len(running.thresholds) else None
        if len(val):
            acc_before.append((evaluate(base, val.x, val.y)[1], len(val)))
            acc_after.append((evaluate(result.head, val.x, val.y)[1], len(val)))
            rate_before.append((exit_rate(base, val.x, threshold), len(val)))
            rate_after.append((exit_rate(result.head, val.x, threshold), len(val)))
        losses.append((result.train_loss if math.isfinite(result.train_loss) else None, n))
        batches = max(1, math.ceil(n / task.batch_size))
        epochs.append(result.steps / batches)
        stopped = stopped or result.stopped_by_budget
    flat = flatten_heads(deltas)
    norm = update_norm(flat)
    clip = min(
        (c for c in (task.clip, task.privacy.clip if task.privacy else None) if c is not None),
        default=None,
    )
    sent: dict[str, Any] = flat
    if clip is not None:
        sent, norm = clip_update(flat, clip)
    noise = 0.0
    if task.privacy is not None and task.privacy.noise_multiplier > 0:
        noise = task.privacy.noise_multiplier
        sent = add_gaussian_noise(
            sent, clip=task.privacy.clip, noise_multiplier=noise, rng=noise_rng
        )
    encoded = encode_update(sent, task.compression, noise_rng)
    loss = _weighted(losses)
    return FedUpdate(
        round_id=task.round_id,
        device_id=device_id,
        model_id=running.model_id,
        base_manifest_sha256=running.manifest_sha256,
        base_version=running.version,
        samples=min(train_n),
        supplied_samples=min(supplied_n),
        val_samples=min(val_n),
        tensors=to_tensors(encoded),
        train_loss=None if loss is None else min(loss, 1e6),
        val_accuracy_before=_weighted(acc_before),
        val_accuracy_after=_weighted(acc_after),
        val_exit_rate_before=_weighted(rate_before),
        val_exit_rate_after=_weighted(rate_after),
        norm=norm,
        clipped=clip is not None and norm > clip,
        noise_multiplier=noise,
        epochs_done=min(epochs),
        stopped_by_budget=stopped,
        cpu_s=max(0.0, budget.clock() - cpu0),
        raw_bytes=raw_bytes(sent),
        encoded_bytes=update_bytes(encoded),
        ts=now(),
    )


def check_eligible(
    task: FedTask, running: RunningBundle, device_id: str, group: str | None, now: float
) -> None:
    """SitOut naming why this device does not take part; None when it may (examples aside)."""
    if task.model_id != running.model_id:
        raise SitOut(
            "wrong_model",
            f"runs model {running.model_id}, the round trains {task.model_id}",
            running_model=running.model_id,
        )
    if task.base_manifest_sha256 != running.manifest_sha256:
        raise SitOut(
            "wrong_base",
            f"runs {running.model_id} v{running.version} (manifest "
            f"{running.manifest_sha256[:12]}), the round's base is v{task.base_version} "
            f"({task.base_manifest_sha256[:12]})",
            running_version=running.version,
            running_sha256=running.manifest_sha256,
        )
    if task.group is not None and task.group != group:
        raise SitOut(
            "not_in_group", f"in group {group}, the round is for {task.group}", group=group
        )
    if not sampled(task.round_id, device_id, task.sampling):
        raise SitOut(
            "not_sampled", f"not among the sampled {task.sampling:.0%} of devices",
            sampling=task.sampling,
        )
    if now >= task.deadline_ts:
        raise SitOut("deadline_passed", "the round's deadline has passed")
    for head in task.heads:
        if head >= len(running.manifest.early_exits):
            base_head(running, head)  # raises the SitOut that names it
