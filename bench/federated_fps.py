"""bench.federated's fps figure: inference while the agent's round worker trains, side by side.

In one process, as in the agent: the inference loop (a StagedModel on one onnxruntime thread,
predict_frame on a device's frames, unpaced: as fast as the CPU allows) runs on this thread
while the agent's FedWorker takes a round's task and trains in its own niced thread, with the
task's CPU budget and its yielding clock. fps is counted over windows before, during (the
worker's own started_ts + wall_s) and after the training; the ratio is during / the mean of
before and after. No broker and no camera thread: publishing is a no-op that says sent.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.config import FederatedConfig
from edgefleet.agent.federated.worker import FedWorker
from edgefleet.agent.protocol import TopicTree
from edgefleet.agent.protocol.codec import encode
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.federated.spec import RoundSpec

from .federated_data import Device
from .federated_engine import GROUP
from .federated_local import running_bundle, task_for

U8 = npt.NDArray[np.uint8]


def until(t: float, event: threading.Event | None = None) -> Callable[[], bool]:
    """A stop condition: wall time t reached, or the event set."""
    return lambda: time.time() >= t or (event is not None and event.is_set())


class Loop:
    """The inference loop: frames one after another (or paced at hz), each timed."""

    def __init__(self, model: StagedModel, pre: Preprocessor, frames: U8, hz: float | None):
        self.model, self.pre, self.frames, self.hz = model, pre, frames, hz
        self.times: list[float] = []  # when each frame's answer was ready
        self.ms: list[float] = []  # how long predict_frame took
        self._i = 0

    def run(self, until: Callable[[], bool]) -> None:
        """Infer until told to stop (checked between frames)."""
        next_at = time.time()
        while not until():
            if self.hz:
                next_at += 1.0 / self.hz
                time.sleep(max(0.0, next_at - time.time()))
            t0 = time.perf_counter()
            self.model.predict_frame(self.frames[self._i % len(self.frames)], self.pre)
            self.ms.append((time.perf_counter() - t0) * 1000.0)
            self.times.append(time.time())
            self._i += 1

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        """(fps, p95 ms) of the frames answered in [t0, t1)."""
        ms = [m for t, m in zip(self.times, self.ms, strict=True) if t0 <= t < t1]
        p95 = float(np.percentile(ms, 95)) if ms else float("nan")
        return len(ms) / max(t1 - t0, 1e-9), p95


def fps_during_training(
    bundle: VerifiedBundle,
    pre: Preprocessor,
    device: Device,
    thresholds: Sequence[float | None],
    *,
    window_s: float,
    budget_s: float,
    repeats: int,
    hz: float | None = None,
) -> dict[str, Any]:
    """Median over repeats of fps during training / fps around it, with every window's fps.

    hz None: unpaced, the loop takes what CPU it gets; else frames come at hz, a camera's
    rate, and the p95 latency shows what training costs a frame.
    """
    model = StagedModel(bundle)
    model.warm_up()
    frames = device.holdout.frames
    running = running_bundle(bundle, thresholds)
    events: list[dict[str, Any]] = []
    done = threading.Event()

    def event(kind: str, _message: str, details: dict[str, Any]) -> None:
        if kind == "fed_update_sent":
            events.append(details)
            done.set()

    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fed-fps-") as tmp:
        tree = TopicTree("bench/fps")
        worker = FedWorker(
            device_id=device.device_id,
            group=GROUP,
            cfg=FederatedConfig(enabled=True),
            tree=tree,
            state_dir=Path(tmp),
            collector=device.collector,
            running=lambda: running,
            publish=lambda _round, _payload: True,
            event=event,
        )
        worker.start()
        try:
            for r in range(repeats):
                loop = Loop(model, pre, frames, hz)
                t_end = time.time() + 0.5  # settle the caches before counting
                loop.run(until(t_end))
                t0 = time.time()
                loop.run(until(t0 + window_s))
                # One round that keeps the worker busy for its whole budget: single-example
                # batches and many epochs, stopped by the CPU budget (as the agent's fps test).
                spec = RoundSpec(
                    group=GROUP,
                    labels="pseudo",
                    min_samples=8,
                    local_epochs=100,
                    batch_size=1,
                    learning_rate=0.001,
                    cpu_budget_s=budget_s,
                )
                task = task_for(spec, bundle, f"fps-{r}", list(range(len(thresholds))))
                done.clear()
                worker.on_task(tree.fed_task(task.round_id), encode(task))
                limit = time.time() + 10 * budget_s + 30
                loop.run(until(limit, done))
                if not done.is_set():
                    raise RuntimeError("the round worker sent no update within its time")
                t2 = time.time()
                loop.run(until(t2 + window_s))
                sent = events[-1]
                start, wall = float(sent["started_ts"]), float(sent["wall_s"])
                before, p95_before = loop.window(t0, t0 + window_s)
                after, p95_after = loop.window(t2, t2 + window_s)
                during, p95_during = loop.window(start, start + wall)
                runs.append(
                    {
                        "fps_before": before,
                        "fps_during": during,
                        "fps_after": after,
                        "ratio": during / ((before + after) / 2),
                        "p95_ms_before": p95_before,
                        "p95_ms_during": p95_during,
                        "p95_ms_after": p95_after,
                        "train_wall_s": wall,
                        "train_cpu_s": float(sent["cpu_s"]),
                        "stopped_by_budget": float(bool(sent["stopped_by_budget"])),
                    }
                )
        finally:
            worker.stop()
    return {
        "fps_during_training_ratio": statistics.median(r["ratio"] for r in runs),
        "paced_hz": hz,
        "runs": runs,
    }
