"""Running a whole simulation (CLI, benchmarks): measure, optional loss bursts, drain, report.

`run_simulation(..., procs=K)` spreads the devices over K processes (spawned, each with its own
loop thread) for more throughput; a barrier after connecting makes them measure the same period
and the parent sums their reports and progress lines.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.synchronize import Barrier as BarrierT
from multiprocessing.synchronize import Event as EventT
from typing import TYPE_CHECKING, Any, Final

from .config import SimConfig
from .engine import Simulator
from .stats import Progress, SimReport, SimStats

if TYPE_CHECKING:
    from multiprocessing.queues import Queue as QueueT

log = logging.getLogger(__name__)

BURST_EVERY_S: Final = 5.0
BURST_LENGTH_S: Final = 2.0
BURST_SHARE: Final = 0.10
DRAIN_TIMEOUT_S: Final = 15.0


def _run_local(
    cfg: SimConfig,
    duration_s: float | None,
    loss_burst: bool,
    progress: Callable[[Progress], None] | None,
    progress_every: float,
    stop: threading.Event | EventT | None,
    barrier: BarrierT | None,
) -> SimReport:
    """Run one Simulator for duration_s (None: until stop is set) and report."""
    sim = Simulator(cfg)
    t0 = time.monotonic()
    sim.start()
    try:
        connect_s = time.monotonic() - t0
        if barrier is not None:
            barrier.wait(timeout=60.0 + 2.0 * cfg.devices / cfg.connect_rate)
        base = sim.stats()
        start = time.monotonic()
        rng = random.Random(cfg.seed)
        next_progress = start + progress_every
        next_burst = start + BURST_EVERY_S
        held: list[str] = []
        held_until = 0.0
        bursts = taken = 0
        while True:
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            if stop is not None and stop.is_set():
                break
            if loss_burst:
                if held and now >= held_until:
                    sim.bring_online(held)
                    held = []
                if not held and now >= next_burst:
                    online = [d.device_id for d in sim.stats().devices if d.online]
                    count = max(1, round(len(online) * BURST_SHARE)) if online else 0
                    held = rng.sample(online, count)
                    if held:
                        log.info("loss burst: taking %d devices offline", len(held))
                        sim.take_offline(held)
                        bursts += 1
                        taken += len(held)
                    held_until = now + BURST_LENGTH_S
                    next_burst = now + BURST_EVERY_S
            if progress is not None and now >= next_progress:
                next_progress = now + progress_every
                progress(_progress(sim.stats(), now - start))
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:  # Ctrl-C ends the measurement; drain and report as usual
                log.info("interrupted: draining and stopping")
                break
        end = sim.stats()
        elapsed = max(time.monotonic() - start, 1e-9)
        if held:
            sim.bring_online(held)
        sim.pause()
        drained = sim.wait_drained(DRAIN_TIMEOUT_S)
        final = sim.stats()
    finally:
        sim.stop(graceful=True)
    return SimReport(
        devices=cfg.devices,
        procs=1,
        duration_s=round(elapsed, 3),
        connect_s=round(connect_s, 3),
        produced=final.produced,
        acked=final.acked,
        overflow=final.overflow,
        backlog=final.backlog,
        publish_rate=round((end.acked - base.acked) / elapsed, 1),
        produce_rate=round((end.produced - base.produced) / elapsed, 1),
        reconnects=final.connects - cfg.devices,
        offline_bursts=bursts,
        taken_offline=taken,
        drained=drained,
    )


def _progress(stats: SimStats, elapsed: float) -> Progress:
    return Progress(
        elapsed_s=round(elapsed, 1),
        produced=stats.produced,
        acked=stats.acked,
        backlog=stats.backlog,
        online=stats.online,
        devices=len(stats.devices),
    )


def _worker(
    k: int,
    cfg: SimConfig,
    duration_s: float | None,
    loss_burst: bool,
    progress_every: float,
    log_level: int,
    out: QueueT[tuple[str, int, Any]],
    barrier: BarrierT,
    stop: EventT,
) -> None:
    """One process of a multi-process run: simulate its share, send progress and the report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into `stop`
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[{k}]: %(message)s"
    )
    try:
        report = _run_local(
            cfg,
            duration_s,
            loss_burst,
            lambda p: out.put(("progress", k, p)),
            progress_every,
            stop,
            barrier,
        )
    except BaseException as exc:
        barrier.abort()  # the others must not wait for this process
        out.put(("error", k, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("report", k, report))


def run_simulation(
    cfg: SimConfig,
    duration_s: float | None,
    procs: int = 1,
    loss_burst: bool = False,
    *,
    progress: Callable[[Progress], None] | None = None,
    progress_every: float = 2.0,
    stop: threading.Event | None = None,
) -> SimReport:
    """Connect cfg.devices devices, produce for duration_s seconds, drain, stop and report.

    procs > 1 splits the devices over that many processes (each with its own loop thread);
    they measure the same period (a barrier after connecting) and the report sums them.
    duration_s None runs until `stop` is set or Ctrl-C. loss_burst takes a random 10% of the
    devices offline ungracefully every few seconds, for a few seconds.
    """
    if procs < 1:
        raise ValueError(f"procs must be >= 1, got {procs}")
    procs = min(procs, cfg.devices)
    if procs == 1:
        return _run_local(cfg, duration_s, loss_burst, progress, progress_every, stop, None)
    return _run_procs(cfg, duration_s, procs, loss_burst, progress, progress_every, stop)


def _run_procs(
    cfg: SimConfig,
    duration_s: float | None,
    procs: int,
    loss_burst: bool,
    progress: Callable[[Progress], None] | None,
    progress_every: float,
    stop: threading.Event | None,
) -> SimReport:
    # spawn: the caller may have threads (tests, a coordinator), which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    out: QueueT[tuple[str, int, Any]] = ctx.Queue()
    barrier = ctx.Barrier(procs)
    stop_evt = ctx.Event()
    base, extra = divmod(cfg.devices, procs)
    workers = []
    first = cfg.first_index
    for k in range(procs):
        n = base + (1 if k < extra else 0)
        sub = replace(
            cfg,
            devices=n,
            first_index=first,
            connect_rate=cfg.connect_rate / procs,
            seed=None if cfg.seed is None else cfg.seed + k,
        )
        first += n
        p = ctx.Process(
            target=_worker,
            args=(
                k,
                sub,
                duration_s,
                loss_burst,
                progress_every,
                logging.getLogger().getEffectiveLevel(),
                out,
                barrier,
                stop_evt,
            ),
            name=f"simulate-{k}",
            daemon=True,
        )
        p.start()
        workers.append(p)
    reports: dict[int, SimReport] = {}
    errors: dict[int, str] = {}
    latest: dict[int, Progress] = {}
    last_emit = time.monotonic()
    try:
        while len(reports) + len(errors) < procs:
            try:
                if stop is not None and stop.is_set():
                    stop_evt.set()
                try:
                    what, k, body = out.get(timeout=0.5)
                except Exception:  # queue.Empty
                    if all(not p.is_alive() for p in workers):
                        break
                    continue
                if what == "report":
                    reports[k] = body
                elif what == "error":
                    errors[k] = body
                    stop_evt.set()
                else:
                    latest[k] = body
                    now = time.monotonic()
                    if (
                        progress is not None
                        and len(latest) == procs  # a partial sum would look like lost devices
                        and now - last_emit >= progress_every * 0.9
                    ):
                        last_emit = now
                        progress(_sum_progress(list(latest.values()), cfg.devices))
            except KeyboardInterrupt:
                stop_evt.set()  # workers drain and report; a second Ctrl-C is handled the same
    finally:
        for p in workers:
            p.join(timeout=30.0)
            if p.is_alive():
                p.terminate()
                p.join(5.0)
    if errors or len(reports) < procs:
        detail = "; ".join(f"process {k}: {e}" for k, e in sorted(errors.items()))
        raise RuntimeError(f"simulation failed: {detail or 'a worker process died'}")
    parts = list(reports.values())
    return SimReport(
        devices=sum(r.devices for r in parts),
        procs=procs,
        duration_s=max(r.duration_s for r in parts),
        connect_s=max(r.connect_s for r in parts),
        produced=sum(r.produced for r in parts),
        acked=sum(r.acked for r in parts),
        overflow=sum(r.overflow for r in parts),
        backlog=sum(r.backlog for r in parts),
        publish_rate=round(sum(r.publish_rate for r in parts), 1),
        produce_rate=round(sum(r.produce_rate for r in parts), 1),
        reconnects=sum(r.reconnects for r in parts),
        offline_bursts=sum(r.offline_bursts for r in parts),
        taken_offline=sum(r.taken_offline for r in parts),
        drained=all(r.drained for r in parts),
    )


def _sum_progress(parts: list[Progress], devices: int) -> Progress:
    return Progress(
        elapsed_s=max(p.elapsed_s for p in parts),
        produced=sum(p.produced for p in parts),
        acked=sum(p.acked for p in parts),
        backlog=sum(p.backlog for p in parts),
        online=sum(p.online for p in parts),
        devices=devices,
    )
