"""The device's part in a federated round: decide, train at low priority, send, keep, resend.

A FedTask arrives retained on fed/{round}/task (Link hands it over on paho's thread; an empty
payload means the round closed). One worker thread, niced per thread and with its CPU time
read from time.thread_time, decides whether the device takes part (the running bundle and
model, the group, sampled(), the deadline, enough examples), fine-tunes each named exit head
from the running bundle's own head weights on the collected features, and publishes one
FedUpdate. The update is kept in state_dir/fed/pending/{round}.json until the round is
cleared or its deadline passes; every time the retained task arrives again (each reconnect,
each restart) the kept update is published again instead of training twice, so a broker
restart or an agent restart loses nothing (the coordinator dedupes). The inference loop
never waits for any of this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import FederatedConfig
from edgefleet.agent.protocol import (
    FedTask,
    FedUpdate,
    ProtocolError,
    TopicTree,
    decode,
    decode_topic,
    encode,
)
from edgefleet.agent.protocol.errors import PayloadTooLargeError, TopicError

from .collect import Examples, FeatureCollector
from .local import Budget, RunningBundle, SitOut, check_eligible, local_update, train_rows

log = logging.getLogger(__name__)

RECHECK_S = 2.0  # how often a round waiting for examples looks again
EXPIRE_EVERY_S = 60.0  # how often kept updates are checked against their deadlines
EventFn = Callable[[str, str, dict[str, Any]], None]


# -- updates kept on disk -----------------------------------------------------------------


class PendingStore:
    """state_dir/fed/pending/{round}.json: an update sent, until its round ends."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, round_id: str) -> Path:
        """Where the update of a round is kept."""
        return self.dir / f"{round_id}.json"

    def save(self, update: FedUpdate, deadline_ts: float) -> None:
        """Atomically (temp file, fsync, rename): a kill leaves the old state or the new."""
        self.dir.mkdir(parents=True, exist_ok=True)
        body = {"deadline_ts": deadline_ts, "update": json.loads(encode(update))}
        tmp = self.dir / f".{update.round_id}.tmp"
        with tmp.open("w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path(update.round_id))

    def load(self, round_id: str) -> tuple[FedUpdate, float] | None:
        """(update, deadline) kept for a round; None when none (or unreadable: removed)."""
        path = self.path(round_id)
        try:
            body = json.loads(path.read_bytes())
            update = decode(FedUpdate, json.dumps(body["update"]).encode())
            deadline = float(body["deadline_ts"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("federated: %s unreadable (%s); removed", path, exc)
            self.remove(round_id)
            return None
        if isinstance(update, ProtocolError):
            log.warning("federated: %s holds no valid update (%s); removed", path, update)
            self.remove(round_id)
            return None
        return update, deadline

    def remove(self, round_id: str) -> None:
        """Forget a round's update."""
        with contextlib.suppress(FileNotFoundError):
            self.path(round_id).unlink()

    def rounds(self) -> list[str]:
        """Rounds with a kept update."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def expire(self, now: float) -> list[str]:
        """Remove the updates of rounds whose deadline has passed; their round ids."""
        gone = []
        for round_id in self.rounds():
            kept = self.load(round_id)
            if kept is not None and kept[1] <= now:
                self.remove(round_id)
                gone.append(round_id)
        return gone


# -- the worker thread --------------------------------------------------------------------


def lower_thread_priority(nice: int) -> bool:
    """Raise this thread's nice value (Linux keeps one per thread); False where it cannot."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning("federated: cannot set the training thread's nice to %d: %s", nice, exc)
        return False
    return True


def yielding_clock(cancel: threading.Event) -> Callable[[], float]:
    """This thread's CPU seconds, read between SGD batches; infinite once cancelled.

    Each read first sleeps 0 s, which lets go of the GIL once per batch, so an inference loop
    waiting for it after an onnxruntime call need not wait for the 5 ms switch interval
    (cheap insurance for slow devices; on the 2-core test machine p95 latency during
    training was the same with and without it). Infinity makes train_head stop at the next
    batch (round closed, agent stopping).
    """

    def clock() -> float:
        if cancel.is_set():
            return math.inf
        time.sleep(0)
        return time.thread_time()

    return clock


class FedWorker:
    """Takes part in the rounds the link hands over; see the module docstring."""

    def __init__(
        self,
        *,
        device_id: str,
        group: str | None,
        cfg: FederatedConfig,
        tree: TopicTree,
        state_dir: Path,
        collector: FeatureCollector,
        running: Callable[[], RunningBundle],
        publish: Callable[[str, bytes], bool],
        event: EventFn,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.group = group
        self.cfg = cfg
        self.tree = tree
        self.collector = collector
        self.running = running
        self.publish = publish
        self.event = event
        self.now = now
        self.pending = PendingStore(state_dir / "fed" / "pending")
        self._inbox: queue.Queue[tuple[str, FedTask | None]] = queue.Queue(maxsize=256)
        self._waiting: dict[str, tuple[FedTask, float]] = {}  # round -> task, give up at
        self._reported: set[tuple[str, str]] = set()
        self._training: str | None = None
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.produced = 0  # updates trained (published or waiting)
        self._thread = threading.Thread(target=self._run, name="fed-train", daemon=True)

    # -- paho's thread ------------------------------------------------------------------

    def on_task(self, topic: str, payload: bytes) -> None:
        """A retained task (or its clearing) arrived: queue it; never blocks paho."""
        try:
            round_id = self.tree.parse(topic).round_id
        except TopicError as exc:
            log.warning("federated: %s", exc)
            return
        if round_id is None:
            return
        if not payload:
            with self._lock:
                if self._training == round_id:
                    self._cancel.set()
            self._put(round_id, None)
            return
        task = decode_topic(self.tree, topic, payload)
        if isinstance(task, ProtocolError) or not isinstance(task, FedTask):
            why = task.message if isinstance(task, ProtocolError) else f"not a task on {topic}"
            log.warning("federated: task refused: %s", why)
            self._report(round_id, "bad_task", why, {})
            return
        self._put(round_id, task)

    def _put(self, round_id: str, task: FedTask | None) -> None:
        try:
            self._inbox.put_nowait((round_id, task))
        except queue.Full:
            log.warning("federated: too many round messages queued; dropped %s", round_id)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop: a training run ends at its next batch; a kept update stays on disk."""
        self._stop.set()
        self._cancel.set()
        self._put("", None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker's thread ------------------------------------------------------------

    def _run(self) -> None:
        lower_thread_priority(self.cfg.nice)
        next_expiry = 0.0
        while not self._stop.is_set():
            try:
                round_id, task = self._inbox.get(timeout=RECHECK_S)
            except queue.Empty:
                round_id, task = "", None
            if self._stop.is_set():
                return
            try:
                if time.monotonic() >= next_expiry:
                    # A round cleared while the device was offline never says so: its kept
                    # update goes when the deadline has passed.
                    for gone in self.pending.expire(self.now()):
                        log.info("federated: round %s is past its deadline; kept update "
                                 "removed", gone)  # fmt: skip
                    next_expiry = time.monotonic() + EXPIRE_EVERY_S
                if round_id and task is None:
                    self._closed(round_id)
                elif task is not None:
                    self._arrived(task)
                self._recheck_waiting()
            except Exception:  # a bug in one round must not end every later one
                log.exception("federated: round %s failed", round_id or "?")

    def _closed(self, round_id: str) -> None:
        self._waiting.pop(round_id, None)
        if self.pending.load(round_id) is not None:
            log.info("federated: round %s closed; its kept update removed", round_id)
        self.pending.remove(round_id)

    def _arrived(self, task: FedTask) -> None:
        kept = self.pending.load(task.round_id)
        now = self.now()
        if kept is not None:
            update, deadline = kept
            if update.base_manifest_sha256 == task.base_manifest_sha256:
                if now >= deadline:  # sent in time; nothing more to do for this round
                    self.pending.remove(task.round_id)
                    return
                # Already trained for this round and base: send the same update again.
                ok = self.publish(task.round_id, encode(update))
                log.info("federated: round %s: kept update %s", task.round_id,
                         "published again" if ok else "waits for the broker")
                return
            self.pending.remove(task.round_id)  # a new task for another base: train again
        try:
            check_eligible(task, self.running(), self.device_id, self.group, now)
        except SitOut as out:
            self._sit_out(task, out)
            return
        budget = self._budget_s(task)
        give_up = task.deadline_ts - min(budget, 0.5 * max(0.0, task.deadline_ts - now))
        self._waiting[task.round_id] = (task, give_up)

    def _budget_s(self, task: FedTask) -> float:
        cap = self.cfg.max_cpu_s
        return task.cpu_budget_s if cap is None else min(task.cpu_budget_s, cap)

    def _recheck_waiting(self) -> None:
        for round_id, (task, give_up) in list(self._waiting.items()):
            if self._stop.is_set():
                return
            try:
                running = self.running()
                check_eligible(task, running, self.device_id, self.group, self.now())
                data = self._examples(task, running)
            except SitOut as out:
                if out.reason != "too_few_samples" or self.now() >= give_up:
                    del self._waiting[round_id]
                    self._sit_out(task, out)
                continue
            del self._waiting[round_id]
            self._train(task, running, data)

    def _examples(self, task: FedTask, running: RunningBundle) -> dict[int, Examples]:
        min_conf = (
            task.min_confidence if self.cfg.min_confidence is None else self.cfg.min_confidence
        )
        data: dict[int, Examples] = {}
        for head in task.heads:
            bundle, ex = self.collector.examples(head, task.labels, min_conf)
            same = bundle == running.manifest_sha256  # else: features of the previous model
            have = train_rows(len(ex), task.val_fraction) if same else 0
            if have < task.min_samples:
                raise SitOut(
                    "too_few_samples",
                    f"{have} training examples for exit {head} (labels {task.labels}, "
                    f"confidence >= {min_conf:g}), the round needs {task.min_samples}",
                    head=head,
                    have=have,
                    need=task.min_samples,
                )
            data[head] = ex
        return data

    def _train(self, task: FedTask, running: RunningBundle, data: dict[int, Examples]) -> None:
        with self._lock:
            self._training = task.round_id
            self._cancel.clear()
        started, wall0 = self.now(), time.monotonic()
        try:
            update = local_update(
                task,
                running,
                data,
                device_id=self.device_id,
                budget=Budget(self._budget_s(task), yielding_clock(self._cancel)),
                noise_rng=np.random.default_rng(),
                now=self.now,
            )
            payload = encode(update)
            failed = None
        except SitOut as out:
            failed = out
        except PayloadTooLargeError as exc:
            failed = SitOut("too_large", str(exc))
        except (ValueError, OSError) as exc:  # a bad head file, fp16 overflow, a full disk
            failed = SitOut("failed", f"local training failed: {exc}")
        finally:
            with self._lock:
                self._training = None
        if self._cancel.is_set():
            log.info("federated: round %s closed or agent stopping: update dropped", task.round_id)
            return
        if failed is not None:
            self._sit_out(task, failed)
            return
        wall = time.monotonic() - wall0
        self.pending.save(update, task.deadline_ts)
        ok = self.publish(task.round_id, payload)
        self.produced += 1
        self._update_sent(task, update, started, wall, ok)

    def _update_sent(
        self, task: FedTask, u: FedUpdate, started: float, wall: float, published: bool
    ) -> None:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.1%}"

        message = (
            f"round {task.round_id}: update sent for exit(s) {task.heads}: {u.samples} "
            f"examples ({u.supplied_samples} supplied), validation accuracy "
            f"{pct(u.val_accuracy_before)} -> {pct(u.val_accuracy_after)}, exit rate "
            f"{pct(u.val_exit_rate_before)} -> {pct(u.val_exit_rate_after)}, "
            f"{u.encoded_bytes} bytes ({task.compression}; {u.raw_bytes} raw), "
            f"{u.cpu_s:.2f} CPU s"
        )
        log.info("federated: %s%s", message, "" if published else " (when the broker is back)")
        self.event(
            "fed_update_sent",
            message,
            {
                "round_id": task.round_id,
                "base_version": u.base_version,
                "heads": ",".join(str(h) for h in task.heads),
                "samples": u.samples,
                "supplied_samples": u.supplied_samples,
                "val_samples": u.val_samples,
                "val_accuracy_before": u.val_accuracy_before,
                "val_accuracy_after": u.val_accuracy_after,
                "val_exit_rate_before": u.val_exit_rate_before,
                "val_exit_rate_after": u.val_exit_rate_after,
                "encoded_bytes": u.encoded_bytes,
                "raw_bytes": u.raw_bytes,
                "compression": task.compression,
                "norm": u.norm,
                "clipped": u.clipped,
                "noise_multiplier": u.noise_multiplier,
                "epochs_done": u.epochs_done,
                "stopped_by_budget": u.stopped_by_budget,
                "cpu_s": u.cpu_s,
                "wall_s": wall,
                "started_ts": started,
                "published": published,
            },
        )

    def _sit_out(self, task: FedTask, out: SitOut) -> None:
        self._report(task.round_id, out.reason, str(out), out.details)

    def _report(self, round_id: str, reason: str, why: str, details: dict[str, Any]) -> None:
        """One fed_skipped event per round and reason in a run (a task comes back on every
        reconnect; the answer does not change)."""
        with self._lock:
            if (round_id, reason) in self._reported:
                return
            self._reported.add((round_id, reason))
        message = f"round {round_id}: sat out: {why}"
        log.info("federated: %s", message)
        self.event("fed_skipped", message, {"round_id": round_id, "reason": reason, **details})
