"""Run a verified bundle's stages in order and stop at the first confident exit."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.bundle import VerifiedBundle
from agent.bundle.manifest import ExitHead

from .chain import PlainChain, StageSessions, make_chain
from .confidence import Rule, confidence, decide_exits, softmax
from .session import choose_providers, session_options


class RuntimeLoadError(Exception):
    """A verified bundle could not be turned into runnable sessions."""


@dataclass
class Prediction:
    """What one frame produced: class, top-1 probability, exit taken, time per stage run.

    exit_index counts exits in order: 0..E-1 are the early exits, E is the final head.
    """

    class_index: int
    confidence: float
    exit_index: int
    stage_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Head:
    spec: ExitHead
    weight: npt.NDArray[np.float32] | None = None
    bias: npt.NDArray[np.float32] | None = None

    def logits(self, value: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        flat = np.asarray(value, dtype=np.float32).reshape(value.shape[0], -1)
        if self.weight is None or self.bias is None:
            return flat
        out: npt.NDArray[np.float32] = flat @ self.weight.T + self.bias
        return out


def exit_decision(logits: npt.NDArray[np.generic], rule: Rule) -> tuple[int, float, float]:
    """(class, top-1 probability, the rule's confidence) of one row of logits.

    For max_softmax the top-1 probability is 1 / sum(exp(z - max z)), the same float64
    value softmax() then confidence() give, without the intermediate arrays: this runs once
    per frame per evaluated exit.
    """
    if rule == "max_softmax":
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        i = int(z.argmax())
        p = float(1.0 / np.exp(z - z[i]).sum())
        return i, p, p
    probs = softmax(np.asarray(logits).reshape(1, -1))
    return int(probs[0].argmax()), float(probs[0].max()), float(confidence(probs, rule)[0])


def top1_probability(logits: npt.NDArray[np.generic]) -> tuple[int, float]:
    """(class, softmax probability of it) of one row of logits, in plain Python floats.

    For the final head, where nothing is compared with a threshold and the probability is
    only reported: ~3 us against ~9 us for the numpy route on 10 classes. Equal to
    softmax() up to rounding in the last bits (summation order).
    """
    values = np.asarray(logits).ravel().tolist()
    top = max(values)
    return values.index(top), 1.0 / math.fsum(math.exp(v - top) for v in values)


def _session(
    verified: VerifiedBundle, name: str, opts: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(verified.read(name), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise RuntimeLoadError(f"{verified.path}/{name}: {exc}") from exc


def _load_head(verified: VerifiedBundle, spec: ExitHead, classes: int) -> _Head:
    if spec.head_file is None:
        return _Head(spec)
    try:
        arrays = np.load(io.BytesIO(verified.read(spec.head_file)), allow_pickle=False)
        weight = np.asarray(arrays["weight"], dtype=np.float32)
        bias = np.asarray(arrays["bias"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as exc:
        raise RuntimeLoadError(f"{verified.path}/{spec.head_file}: bad exit head ({exc})") from exc
    if weight.ndim != 2 or weight.shape[0] != classes or bias.shape != (classes,):
        raise RuntimeLoadError(
            f"{verified.path}/{spec.head_file}: head weight {weight.shape} / bias {bias.shape} "
            f"do not fit {classes} classes"
        )
    return _Head(spec, weight, bias)


class StagedModel:
    """Sessions for every stage of a bundle, plus its exit heads and thresholds."""

    def __init__(
        self,
        verified: VerifiedBundle,
        *,
        threads: int = 1,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.manifest = verified.manifest
        m = self.manifest
        opts = session_options(threads)
        chosen = choose_providers(providers)
        classes = len(m.labels)
        self.sessions: list[ort.InferenceSession] = []
        self.branches: list[ort.InferenceSession | None] = []
        self.heads: list[_Head | None] = []
        for stage in m.stages:
            self.sessions.append(_session(verified, stage.file, opts, chosen))
            graph = stage.exit.graph_file if stage.exit else None
            self.branches.append(_session(verified, graph, opts, chosen) if graph else None)
            self.heads.append(_load_head(verified, stage.exit, classes) if stage.exit else None)
        # What each stage session is asked for: passed-on tensors, plus the exit's tensor when
        # the stage computes it itself (no separate branch graph).
        self._fetch = [
            [
                *stage.outputs,
                *([stage.exit.output] if stage.exit and not stage.exit.graph_file else []),
            ]
            for stage in m.stages
        ]
        self._pass = [list(stage.outputs) for stage in m.stages]
        last = len(m.stages) - 1
        self._layout = [(head, k == last) for k, head in enumerate(self.heads)]
        self._sessions = StageSessions(
            m.input.name, self.sessions, self.branches, self._fetch, self._pass
        )
        self._chain = make_chain(self._sessions)
        ops = m.operating_points
        self.thresholds: list[float | None] = (
            list(ops[m.default_operating_point].thresholds) if ops else []
        )
        self.early_exits = m.early_exits

    def set_thresholds(self, thresholds: Sequence[float | None]) -> None:
        """Replace the current thresholds (one per early exit)."""
        if len(thresholds) != len(self.early_exits):
            raise ValueError(
                f"{len(thresholds)} thresholds for {len(self.early_exits)} early exit(s)"
            )
        self.thresholds = list(thresholds)

    def predict(self, x: npt.NDArray[np.generic]) -> Prediction:
        """Run one preprocessed input (batch of one) through the stages until an exit fires.

        This is the per-frame hot path: microseconds here are percents of an INT8 model's
        time, so stages pass tensors through bound buffers (chain.py), per-stage data is
        looked up once, and a max-softmax exit is decided without a probability vector.
        Not for concurrent use: the buffers are shared from frame to frame.
        """
        chain = self._chain
        chain.load(x)
        stage_ms: list[float] = []
        exit_pos = 0
        clock = time.perf_counter
        thresholds = self.thresholds
        for k, (head, last) in enumerate(self._layout):
            threshold = None if head is None or last else thresholds[exit_pos]
            t0 = clock()
            outs = chain.stage(k, last or threshold is not None)
            stage_ms.append((clock() - t0) * 1000.0)
            if head is None:
                continue
            if last:
                cls, top1 = top1_probability(head.logits(outs[-1]))
                return Prediction(cls, top1, exit_pos, stage_ms)
            if threshold is not None:
                value = chain.exit_value(k, outs)
                cls, top1, score = exit_decision(head.logits(value), head.spec.rule)
                if score >= threshold:
                    return Prediction(cls, top1, exit_pos, stage_ms)
            exit_pos += 1
        raise AssertionError("unreachable: the last stage always has an exit")

    def all_exit_logits(self, x: npt.NDArray[np.generic]) -> list[npt.NDArray[np.float32]]:
        """Logits of every exit (early exits, then the final head) for a batch; no early stop."""
        chain = PlainChain(self._sessions)  # any batch size: plain session.run
        chain.load(x)
        result: list[npt.NDArray[np.float32]] = []
        for k, head in enumerate(self.heads):
            outs = chain.stage(k, True)
            if head is not None:
                result.append(head.logits(chain.exit_value(k, outs)))
        return result

    def classify_batch(self, x: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.int64], ...]:
        """(class index, exit index) per sample of a batch under the current thresholds."""
        logits = self.all_exit_logits(x)
        probs = [softmax(z) for z in logits]
        rules = [h.spec.rule for h in self.heads if h is not None]
        early = [confidence(p, r) for p, r in zip(probs[:-1], rules[:-1], strict=True)]
        taken = (
            decide_exits(early, self.thresholds)
            if early
            else np.zeros(len(probs[-1]), dtype=np.int64)
        )
        stacked = np.stack([p.argmax(axis=-1) for p in probs])
        classes = stacked[taken, np.arange(len(taken))]
        return classes.astype(np.int64), taken
