"""onnxruntime session options for small devices, thread counts, probes, providers.

Threads, as the agent runs a bundle: every session has its own intra-op pool with spinning
off; stage sessions get the configured thread count, exit branch graphs one thread
(EXIT_BRANCH_THREADS); `probe_threads` can pick a stage's count at load (StagedModel's
thread_probe, off by default). Measured on the shared 2-core AMD EPYC box (AVX2, no VNNI),
reference CNN bundle, 2 threads, contenders interleaved in one process:

* Exit branches on one thread: the staged model at its default point 1.19x and 1.21x faster
  (exits_speedup_2t 3.6 -> 4.5, 3.9 -> 4.55), with exits off unchanged (0.95, 1.05: noise).
  A branch (pooling, a reshape) is as fast on one thread as on two when the second core is
  free (fastest runs 0.040 / 0.042 ms), but a two-thread run may wait on a worker that
  another process keeps off the second core.
* Stage threads by probe lost: fastest runs say two threads make each stage 1.6-1.75x faster
  on a free core, but a probe at load on a busy machine often never sees the core free and
  picks one thread; with exits off the probed model ran 0.68-0.80x the speed of two fixed
  threads. Hence opt-in, for devices whose load at start is what they run under.
* Spinning pools lose. onnxruntime's one global pool (`set_global_thread_pool_sizes` plus
  `use_per_session_threads = False`, so stages never wake a second pool) made the staged
  model 3.9x and unsplit INT8 1.8x slower under load; per-session spinning with
  `session.force_spinning_stop` 1.8x slower. A spinning pool also burns ~50 ms of CPU after
  every run (51 ms of process CPU in 200 ms idle), so above 20 fps it pins a core. The
  global pool is moreover process-wide and irrevocable: once a session has used it, every
  later session of the process must set `use_per_session_threads = False` (onnxruntime
  refuses any other), its size never changes, and the Python API cannot turn its spinning
  off (`allow_spinning` and `force_spinning_stop` entries apply to per-session pools only;
  measured: the same idle CPU with either).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .chain import ONNX_DTYPES

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

# An exit branch graph (pooling, a reshape) has no op worth a second thread: fastest runs of
# 0.040 ms on one thread and 0.042 on two for the reference bundle's, and a two-thread session
# may stall on a worker that another process keeps off the second core.
EXIT_BRANCH_THREADS = 1
# A larger thread count (or another provider) must be this much faster to be chosen: it
# costs a wake-up per run on a busy device that a probe of a few runs does not see.
THREAD_MARGIN = 0.10
# Timed runs per candidate: the fastest of 15 often missed every moment the second core was
# free on the shared test box (stages chosen at random), of 40-60 it did not. A probe ends
# early after PROBE_BUDGET_S of timed runs (a large model on a slow device), never before
# PROBE_MIN_RUNS runs per candidate.
PROBE_RUNS = 40
PROBE_MIN_RUNS = 5
PROBE_BUDGET_S = 1.0
PROBE_WARMUP = 3



def session_options(threads: int = 1) -> ort.SessionOptions:
    """Fixed thread count, spinning off, full graph optimisation.

    Spinning is off because several stage sessions share the cores: spinning intra-op
    pools fight each other (measured +55-77% latency with 2 threads, see EDGE-NOTES), and
    a spinning pool takes the core other work on the device needs (module docstring).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def prefer_unless_faster(timings: Mapping[K, float], base: K, margin: float) -> K:
    """`base`, unless the fastest other entry takes at most (1 - margin) of base's time.

    The rule behind both choices made at load (thread counts, execution providers): the
    simple default stays unless the alternative wins clearly, since a probe of a few runs
    on a device is noisy and a wrong switch costs every frame after.
    """
    if base not in timings:
        raise ValueError(f"no timing for the default {base!r}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin {margin} outside [0, 1)")
    fastest = min(timings, key=lambda k: timings[k])
    return fastest if timings[fastest] <= timings[base] * (1.0 - margin) else base


def choose_threads(timings: Mapping[int, float], margin: float = THREAD_MARGIN) -> int:
    """The fewest threads, unless more threads are faster by the margin (ms per run each)."""
    return prefer_unless_faster(timings, min(timings), margin)


def probe(
    built: Mapping[K, T],
    run: Callable[[T], object],
    *,
    runs: int = PROBE_RUNS,
    warmup: int = PROBE_WARMUP,
    budget_s: float = PROBE_BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, float]:
    """Fastest ms per run of each built candidate, the candidates alternating run by run.

    The fastest run, not the median: another process only ever adds time, and a probe of a
    few runs at load often overlaps such a burst (on the shared 2-core test box medians
    picked one thread for every session, minimums the choice a quiet device makes).
    Alternating spreads what noise is left over every candidate; each candidate first runs
    `warmup` times untimed (weight packing, allocations). Timing stops after `runs` rounds,
    or once `budget_s` seconds of timed runs are spent and PROBE_MIN_RUNS rounds are done.
    """
    for item in built.values():
        for _ in range(warmup):
            run(item)
    times: dict[K, list[float]] = {k: [] for k in built}
    spent = 0.0
    for done in range(runs):
        if done >= PROBE_MIN_RUNS and spent >= budget_s:
            break
        for k, item in built.items():
            t0 = clock()
            run(item)
            elapsed = clock() - t0
            spent += elapsed
            times[k].append(elapsed * 1000.0)
    return {k: min(v) for k, v in times.items()}


def blank_feeds(sess: ort.InferenceSession) -> dict[str, npt.NDArray[np.generic]]:
    """Zeros for every input of a session; a dynamic dim is taken as 1."""
    feeds: dict[str, npt.NDArray[np.generic]] = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (arg.shape or [])]
        feeds[arg.name] = np.zeros(shape, ONNX_DTYPES.get(arg.type, np.float32))
    return feeds


def probe_threads(
    make: Callable[[int], ort.InferenceSession],
    threads: int,
    *,
    margin: float = THREAD_MARGIN,
    runs: int = PROBE_RUNS,
) -> tuple[ort.InferenceSession, int, dict[int, float]]:
    """One session built at 1 and at `threads` threads, timed on zeros; the faster kept.

    Returns (session, its thread count, ms per run of each count). With threads == 1 there
    is nothing to choose and nothing is timed. Thread counts never change the results:
    onnxruntime's CPU kernels split work by output element, and the tests check bundles
    bit for bit at either count.
    """
    if threads <= 1:
        return make(1), 1, {}
    built = {n: (sess, blank_feeds(sess)) for n, sess in ((1, make(1)), (threads, make(threads)))}
    timings = probe(built, lambda pair: pair[0].run(None, pair[1]), runs=runs)
    chosen = choose_threads(timings, margin)
    return built[chosen][0], chosen, timings


def choose_providers(wanted: Sequence[str] | None) -> list[str]:
    """The wanted providers this build of onnxruntime has, always ending with CPU.

    One log line when any wanted provider is missing (a CPU-only wheel on a Jetson, say),
    naming what was asked for, what this build has and what will be used.
    """
    available = ort.get_available_providers()
    asked = list(wanted or ["CPUExecutionProvider"])
    chosen = [name for name in asked if name in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    missing = [name for name in asked if name not in available]
    if missing:
        log.warning(
            "execution providers %s not in this onnxruntime build (it has %s); using %s",
            ", ".join(missing),
            ", ".join(available),
            ", ".join(chosen),
        )
    return chosen


def report_fallback(sess: ort.InferenceSession, chosen: Sequence[str], what: str) -> None:
    """One log line when onnxruntime itself dropped a provider (no GPU, driver mismatch)."""
    active = sess.get_providers()
    dropped = [name for name in chosen if name not in active]
    if dropped:
        log.warning(
            "%s: onnxruntime could not use %s; running on %s",
            what,
            ", ".join(dropped),
            ", ".join(active),
        )
