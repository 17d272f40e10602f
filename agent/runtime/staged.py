"""Run a verified bundle's stages in order and stop at the first confident exit."""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.bundle.manifest import ExitHead

from .chain import PlainChain, StageSessions, make_chain
from .confidence import Rule, confidence, decide_exits, softmax
from .preprocess import Frame, Preprocessor
from .providers import AUTO, probe_providers
from .session import (
    EXIT_BRANCH_THREADS,
    choose_providers,
    probe_threads,
    report_fallback,
    session_options,
)

# One stage of the per-frame plan: (run it, stage, head to test or None, exit number,
# threshold).
_Step = tuple[Callable[[], list[npt.NDArray[np.generic]]], int, "_Head | None", int, float | None]


log = logging.getLogger(__name__)


class RuntimeLoadError(Exception):
    """A verified bundle could not be turned into runnable sessions."""


@dataclass(slots=True)
class Prediction:
    """What one frame produced: class, top-1 probability, exit taken, time per stage run.

    exit_index counts exits in order: 0..E-1 are the early exits, E is the final head.
    For the final head the probability is worked out from the kept logits when first read:
    results are rate-limited, so most frames never need it.
    """

    class_index: int
    exit_index: int
    stage_ms: list[float] = field(default_factory=list)
    top1: float | None = None
    logits: list[float] | None = field(default=None, repr=False)

    @property
    def confidence(self) -> float:
        """Softmax probability of the predicted class at the exit taken."""
        if self.top1 is None:
            if not self.logits:
                raise ValueError("a Prediction needs top1 or the logits it came from")
            top = self.logits[self.class_index]
            self.top1 = 1.0 / math.fsum(math.exp(v - top) for v in self.logits)
        return self.top1


@dataclass(frozen=True, eq=False)
class Probe:
    """A frame run at full depth: the final head's prediction, and what each early exit saw.

    features[k] is early exit k's input as its head reads it (flattened float32, a copy);
    logits are the final head's. The prediction's exit_index is the final head's.
    """

    prediction: Prediction
    features: list[npt.NDArray[np.float32]]
    logits: npt.NDArray[np.float32]


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


def _final_prediction(
    logits: npt.NDArray[np.generic], exit_index: int, stage_ms: list[float]
) -> Prediction:
    # Ten plain floats are cheaper to scan than a numpy argmax call (~0.3 us against ~1).
    values: list[float] = np.asarray(logits).ravel().tolist()
    return Prediction(values.index(max(values)), exit_index, stage_ms, logits=values)


def _session_with_threads(
    verified: VerifiedBundle, providers: list[str], threads: int, by_probe: bool, name: str
) -> tuple[ort.InferenceSession, int]:
    """One session of the bundle and its thread count: `threads`, or chosen by probe."""
    data = verified.read(name)

    def make(n: int) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(data, session_options(n), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RuntimeLoadError(f"{verified.path}/{name}: {exc}") from exc

    if not by_probe:
        return make(threads), threads
    try:
        sess, chosen, _ = probe_threads(make, threads)
    except RuntimeLoadError:
        raise
    except Exception as exc:  # a first run on zeros failed: onnxruntime's own errors
        raise RuntimeLoadError(f"{verified.path}/{name}: probe run failed: {exc}") from exc
    return sess, chosen


def _auto_provider(verified: VerifiedBundle, threads: int, thread_probe: bool) -> str:
    """The execution provider a probe of every candidate finds fastest for this bundle."""
    choice = probe_providers(
        lambda p: StagedModel(verified, threads=threads, providers=[p], thread_probe=thread_probe),
        lambda model: model.warm_up(1),
        active=lambda model: model.sessions[0].get_providers(),
    )
    return choice.provider


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
        thread_probe: bool = False,
    ) -> None:
        """Build every stage and exit branch session of a verified bundle.

        threads: the intra-op threads of each stage session. An exit branch graph always
        runs on one thread (session.EXIT_BRANCH_THREADS). With thread_probe, each stage runs
        on one thread unless a probe at load finds `threads` faster by a margin
        (session.probe_threads); off by default, see session.py for why.
        providers: execution providers in order of preference; ["auto"] probes every
        candidate this onnxruntime build has and keeps the fastest (providers.py).
        """
        self.manifest = verified.manifest
        self.verified = verified  # what runs, exactly: its manifest sha256 is in the status
        m = self.manifest
        if providers is not None and AUTO in providers:
            providers = [_auto_provider(verified, threads, thread_probe)]
        chosen = choose_providers(providers)
        self.providers = chosen
        classes = len(m.labels)
        self.sessions: list[ort.InferenceSession] = []
        self.branches: list[ort.InferenceSession | None] = []
        self.heads: list[_Head | None] = []
        # Intra-op threads each session runs on, stages then branches (None: no branch).
        self.stage_threads: list[int] = []
        self.branch_threads: list[int | None] = []
        load = functools.partial(_session_with_threads, verified, chosen, threads, thread_probe)
        for stage in m.stages:
            sess, n = load(stage.file)
            self.sessions.append(sess)
            self.stage_threads.append(n)
            graph = stage.exit.graph_file if stage.exit else None
            branch, bn = (
                _session_with_threads(verified, chosen, EXIT_BRANCH_THREADS, False, graph)
                if graph
                else (None, None)
            )
            self.branches.append(branch)
            self.branch_threads.append(bn)
            self.heads.append(_load_head(verified, stage.exit, classes) if stage.exit else None)
        if thread_probe and threads > 1:
            log.info("%s: stage threads by probe: %s", verified.path, self.stage_threads)
        report_fallback(self.sessions[0], chosen, f"{verified.path}/{m.stages[0].file}")
        # What each stage session is asked for: passed-on tensors, plus the exit's tensor when
        # the stage computes it itself (no separate branch graph).
        self._fetch = [
            [
                *stage.outputs,
                *([stage.exit.output] if stage.exit and not stage.exit.graph_file else []),
            ]
            for stage in m.stages
        ]
        if m.detection is not None:
            # A detector's last stage has no exit: what it gives is the decoder's raw outputs.
            self._fetch[-1] = [*self._fetch[-1], *m.detection.outputs]
        self._pass = [list(stage.outputs) for stage in m.stages]
        self._sessions = StageSessions(
            m.input.name, self.sessions, self.branches, self._fetch, self._pass
        )
        self._chain = make_chain(self._sessions)
        ops = m.operating_points
        self.thresholds: list[float | None] = (
            list(ops[m.default_operating_point].thresholds) if ops else []
        )
        self.early_exits = m.early_exits
        self._steps = self._plan()
        self._fits_input: Preprocessor | None = None

    def set_thresholds(self, thresholds: Sequence[float | None]) -> None:
        """Replace the current thresholds (one per early exit)."""
        if len(thresholds) != len(self.early_exits):
            raise ValueError(
                f"{len(thresholds)} thresholds for {len(self.early_exits)} early exit(s)"
            )
        self.thresholds = list(thresholds)
        self._steps = self._plan()

    def warm_up(self, runs: int = 3) -> float:
        """Run every stage and exit branch on a blank input; returns the seconds it took.

        onnxruntime allocates, packs weights and (CUDA, TensorRT) picks kernels or builds
        engines on a session's first runs: done here at load, the first camera frame costs
        what every later one does. Every exit is evaluated and none may fire (thresholds
        above any confidence), so each session runs; the thresholds are put back after.
        """
        t0 = time.perf_counter()
        buffer = self._chain.input_buffer
        if buffer is not None:
            blank = np.zeros_like(buffer)
        else:  # dynamic dims: a batch of one at the smallest size
            tensor = self.manifest.input
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in tensor.shape]
            blank = np.zeros(shape, dtype=np.dtype(tensor.dtype))
        if self.manifest.detection is not None:  # no exits, no class: run the stages
            for _ in range(runs):
                self.raw_outputs(blank)
            return time.perf_counter() - t0
        saved = list(self.thresholds)
        self.set_thresholds([math.inf] * len(self.early_exits))
        try:
            for _ in range(runs):
                self.predict(blank)
        finally:
            self.set_thresholds(saved)
        return time.perf_counter() - t0

    def raw_outputs(self, x: npt.NDArray[np.generic]) -> list[npt.NDArray[np.generic]]:
        """Run one preprocessed input through every stage; the last stage's fetched outputs.

        A detector's raw outputs (manifest detection.outputs, in that order), for
        agent/detect/decode.py. The arrays may be the chain's buffers: valid until the next
        frame.
        """
        self._chain.load(x)
        outs: list[npt.NDArray[np.generic]] = []
        for k in range(len(self.sessions)):
            outs = self._chain.stage(k, True)
        return outs

    def predict(self, x: npt.NDArray[np.generic]) -> Prediction:
        """Run one preprocessed input (batch of one) through the stages until an exit fires."""
        self._chain.load(x)
        return self._run_loaded()

    def predict_frame(self, frame: Frame, pre: Preprocessor) -> Prediction:
        """Preprocess one camera frame straight into the first stage's input, then predict.

        The agent's per-frame path: where the stages run on bound buffers, `pre` writes the
        tensor into the bound input itself (no tensor allocated, none copied); otherwise
        this is `predict(pre(frame))`. Same prediction either way (tested).
        """
        buffer = self._chain.input_buffer
        if buffer is None:
            return self.predict(pre(frame))
        if pre is not self._fits_input:
            if buffer.shape != pre.shape:
                return self.predict(pre(frame))
            self._fits_input = pre  # checked once per preprocessor, not per frame
        pre.into(frame, buffer)
        return self._run_loaded()

    def _run_loaded(self) -> Prediction:
        """Run the stages on the input already loaded, stopping at the first confident exit.

        This is the per-frame hot path: microseconds here are percents of an INT8 model's
        time, so stages pass tensors through bound buffers (chain.py), the steps for the
        current thresholds are worked out once (`_plan`), a max-softmax exit is decided
        without a probability vector and the final head's probability only when read.
        Not for concurrent use: the buffers are shared from frame to frame.
        """
        stage_ms: list[float] = []
        clock = time.perf_counter
        for run, k, head, exit_pos, threshold in self._steps:
            t0 = clock()
            outs = run()
            stage_ms.append((clock() - t0) * 1000.0)
            if head is None:
                continue  # exit disabled (or none here): pass on
            if threshold is None:  # the final head; plain logits need no float32 copy
                final = outs[-1] if head.weight is None else head.logits(outs[-1])
                return _final_prediction(final, exit_pos, stage_ms)
            value = self._chain.exit_value(k, outs)
            cls, top1, score = exit_decision(head.logits(value), head.spec.rule)
            if score >= threshold:
                return Prediction(cls, exit_pos, stage_ms, top1)
        raise AssertionError("unreachable: the last stage always has an exit")

    def probe(self, x: npt.NDArray[np.generic]) -> Probe:
        """Run one preprocessed input (batch of one) at full depth; see probe_frame."""
        self._chain.load(x)
        return self._probe_loaded()

    def probe_frame(self, frame: Frame, pre: Preprocessor) -> Probe:
        """Like predict_frame, but every stage runs and every early exit's features come back.

        What a federated round trains on (agent/federated/): a frame that exits early never
        reaches the final head, so it has no pseudo label; a probed frame has both. The
        prediction is the final head's, whatever the thresholds say.
        """
        buffer = self._chain.input_buffer
        if buffer is None or buffer.shape != pre.shape:
            return self.probe(pre(frame))
        pre.into(frame, buffer)
        return self._probe_loaded()

    def _probe_loaded(self) -> Probe:
        stage_ms: list[float] = []
        features: list[npt.NDArray[np.float32]] = []
        final: npt.NDArray[np.generic] | None = None
        clock = time.perf_counter
        last = len(self.heads) - 1
        for k, head in enumerate(self.heads):
            t0 = clock()
            outs = self._chain.stage(k, head is not None)
            if head is None:
                stage_ms.append((clock() - t0) * 1000.0)
                continue
            value = self._chain.exit_value(k, outs)
            if k == last:
                final = head.logits(value)
                stage_ms.append((clock() - t0) * 1000.0)
                break
            # A copy, in exactly the form the head reads (_Head.logits): the chain's buffers
            # are overwritten by the next frame.
            features.append(np.array(value, dtype=np.float32).reshape(-1))
            stage_ms.append((clock() - t0) * 1000.0)
        if final is None:
            raise AssertionError("unreachable: the last stage always has an exit")
        logits = np.array(final, dtype=np.float32).reshape(-1)
        pred = _final_prediction(logits, len(features), stage_ms)
        return Probe(pred, features, logits)

    def _plan(self) -> list[_Step]:
        """Per stage: its runner, and the head, exit number and threshold to test after it.

        head is None where nothing is tested (no exit, or the exit disabled); threshold is
        None for the final head, which always answers.
        """
        steps: list[_Step] = []
        exit_pos = 0
        last = len(self.heads) - 1
        for k, head in enumerate(self.heads):
            if head is None:
                steps.append((self._chain.runner(k, False), k, None, exit_pos, None))
                continue
            if k == last:
                steps.append((self._chain.runner(k, True), k, head, exit_pos, None))
                break
            threshold = self.thresholds[exit_pos]
            evaluate = threshold is not None
            run = self._chain.runner(k, evaluate)
            steps.append((run, k, head if evaluate else None, exit_pos, threshold))
            exit_pos += 1
        return steps

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
