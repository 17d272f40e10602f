"""Execution provider chosen by probe: every candidate this onnxruntime build has, timed.

A target may ship a provider that serves it better than the CPU one (XNNPACK on ARM,
OpenVINO on Intel x86, CUDA or TensorRT on a Jetson), or worse (a small INT8 model whose
QDQ nodes a provider does not take runs partly on the CPU with copies between). Which one
wins is measured on the device at load, not assumed: the model is built with each
candidate, warmed up, timed on a blank input, and the CPU provider kept unless another is
faster by a margin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import onnxruntime as ort

from .session import PROBE_RUNS, PROBE_WARMUP, prefer_unless_faster, probe

log = logging.getLogger(__name__)

M = TypeVar("M")

CPU = "CPUExecutionProvider"
AUTO = "auto"  # the model config's providers value that asks for the probe
# Providers worth a probe, in no order that matters (the timings decide). Azure and other
# remote or compile-only providers are not candidates.
CANDIDATES = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "XnnpackExecutionProvider",
    CPU,
)
# Another provider must take at most 90% of the CPU provider's time: a switch to a less
# common provider is paid in load time, memory and support, and a probe is noisy.
PROVIDER_MARGIN = 0.10


@dataclass(frozen=True)
class ProviderChoice(Generic[M]):
    """The provider kept, its built model, every candidate's ms per run, and why any failed."""

    provider: str
    model: M
    timings_ms: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)


def candidate_providers(available: Sequence[str] | None = None) -> list[str]:
    """The candidates this onnxruntime build has; the CPU provider always among them."""
    have = set(ort.get_available_providers() if available is None else available)
    found = [name for name in CANDIDATES if name in have and name != CPU]
    return [*found, CPU]


def choose_fastest(timings: Mapping[str, float], margin: float = PROVIDER_MARGIN) -> str:
    """The CPU provider, unless the fastest other takes at most (1 - margin) of its time.

    timings: ms per run by provider name; must include the CPU provider.
    """
    return prefer_unless_faster(timings, CPU, margin)


def probe_providers(
    build: Callable[[str], M],
    run: Callable[[M], object],
    *,
    candidates: Sequence[str] | None = None,
    active: Callable[[M], Sequence[str]] | None = None,
    margin: float = PROVIDER_MARGIN,
    runs: int = PROBE_RUNS,
    warmup: int = PROBE_WARMUP,
) -> ProviderChoice[M]:
    """Build the model with each candidate provider, time `run` on each, keep the fastest.

    build(provider) makes the model on that provider (raising if it cannot); run(model)
    runs it once on a blank input; active(model), where given, names the providers the
    model's sessions actually use. A candidate whose build or first run fails is skipped
    with one log line, and so is one that onnxruntime quietly replaced (it builds a session
    on the CPU provider when the asked one cannot start); the CPU provider's failure is the
    caller's (it is raised).
    """
    names = list(candidates) if candidates is not None else candidate_providers()
    if CPU not in names:
        names.append(CPU)
    built: dict[str, M] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            model = build(name)
            run(model)  # a provider may build lazily and fail only on a first run
        except Exception as exc:  # onnxruntime and providers raise their own untyped errors
            if name == CPU:
                raise
            skipped[name] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            log.warning("execution provider %s skipped: %s", name, skipped[name])
            continue
        if active is not None and name not in active(model):
            skipped[name] = f"onnxruntime ran it on {', '.join(active(model))} instead"
            log.warning("execution provider %s skipped: %s", name, skipped[name])
            continue
        built[name] = model
    timings = probe(built, run, runs=runs, warmup=warmup)
    chosen = choose_fastest(timings, margin)
    log.info(
        "execution provider %s chosen by probe (ms per run: %s)",
        chosen,
        ", ".join(f"{k} {v:.3f}" for k, v in timings.items()),
    )
    return ProviderChoice(chosen, built[chosen], timings, skipped)
