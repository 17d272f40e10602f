"""Stage sessions chained through fixed buffers, so passing a tensor on costs nothing.

With `session.run(names, feeds)` every call wraps the feeds, allocates fresh outputs and
hands them back as new numpy arrays; for a model split into three stages plus exit branches
that is measurable per frame (a few percent of the reference model's INT8 time). Here each
session's inputs and outputs are bound once (onnxruntime IOBinding) to buffers allocated at
load: stage k writes its uint8 map into the very buffer stage k+1 and the exit branch read.
A frame then costs one copy of the input and one `run_with_iobinding` per session.

This needs static shapes (the optimizer fixes batch 1 and the input size); a bundle with a
dynamic dim anywhere runs through plain `session.run` instead, with the same results.
Buffers are reused frame after frame: not for concurrent use, and a returned array is only
valid until the next frame.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

Array = npt.NDArray[np.generic]
log = logging.getLogger(__name__)

# onnxruntime's type strings -> numpy dtypes, for buffers and blank inputs.
ONNX_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _static(arg: ort.NodeArg) -> tuple[list[int], type[np.generic]] | None:
    """(shape, dtype) when both are fixed and known, else None."""
    dtype = ONNX_DTYPES.get(arg.type)
    shape = arg.shape
    if dtype is None or shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return [int(d) for d in shape], dtype


@dataclass(frozen=True)
class StageSessions:
    """A bundle's sessions and what flows between them, as StagedModel loaded them.

    fetch[k]: stage k's outputs when its exit is evaluated; passed[k]: those it passes on
    (empty for the last stage); branches[k]: stage k's exit branch graph, if it has one.
    """

    input_name: str
    sessions: Sequence[ort.InferenceSession]
    branches: Sequence[ort.InferenceSession | None]
    fetch: Sequence[Sequence[str]]
    passed: Sequence[Sequence[str]]


class _Bound:
    """One session with a fixed set of outputs bound to buffers."""

    def __init__(
        self, sess: ort.InferenceSession, buffers: dict[str, Array], outputs: Sequence[str]
    ) -> None:
        self.sess = sess
        self.binding = sess.io_binding()
        for arg in sess.get_inputs():
            buf = buffers[arg.name]
            self.binding.bind_input(arg.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self.outputs = [buffers[name] for name in outputs]
        for name, buf in zip(outputs, self.outputs, strict=True):
            self.binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        self._call = _direct_call(sess, self.binding)

    def run(self) -> list[Array]:
        self._call()
        return self.outputs


def _direct_call(sess: ort.InferenceSession, binding: ort.IOBinding) -> Callable[[], object]:
    """A callable that runs `sess` on `binding`, as cheaply as this onnxruntime allows.

    The public `run_with_iobinding` wraps the C++ call in Python-level checks for WebGPU
    graph capture (onnxruntime >= 1.2x) that cost ~0.5 us per call, paid per stage per frame
    here. Every 1.x release keeps the C++ session and binding as `_sess` and `_iobinding`;
    where they are missing, the public method is used. Both give the same outputs (tested).
    """
    inner = getattr(sess, "_sess", None)
    handle = getattr(binding, "_iobinding", None)
    if inner is not None and handle is not None and hasattr(inner, "run_with_iobinding"):
        return functools.partial(inner.run_with_iobinding, handle, None)
    return functools.partial(sess.run_with_iobinding, binding)


class BoundChain:
    """Every stage and exit branch of a bundle on shared, preallocated buffers."""

    def __init__(self, plan: StageSessions) -> None:
        sessions, branches, fetch, passed = plan.sessions, plan.branches, plan.fetch, plan.passed
        buffers: dict[str, Array] = {}
        for sess in [*sessions, *(b for b in branches if b is not None)]:
            for arg in [*sess.get_inputs(), *sess.get_outputs()]:
                spec = _static(arg)
                if spec is None:
                    raise ValueError(f"{arg.name}: shape {arg.shape} or type {arg.type} not fixed")
                shape, dtype = spec
                known = buffers.get(arg.name)
                if known is not None and (list(known.shape) != shape or known.dtype != dtype):
                    raise ValueError(f"{arg.name}: {arg.shape} {arg.type} disagrees between graphs")
                if known is None:
                    buffers[arg.name] = np.zeros(shape, dtype)
        self.input = buffers[plan.input_name]
        self.input_buffer: Array | None = self.input
        # Per stage: outputs when its exit is skipped, and when it is evaluated.
        self.skip = [_Bound(s, buffers, p) for s, p in zip(sessions, passed, strict=True)]
        self.full = [
            self.skip[k] if list(f) == list(p) else _Bound(s, buffers, f)
            for k, (s, f, p) in enumerate(zip(sessions, fetch, passed, strict=True))
        ]
        self.branches = [
            None if b is None else _Bound(b, buffers, [o.name for o in b.get_outputs()])
            for b in branches
        ]

    def load(self, x: Array) -> None:
        """Copy one preprocessed input into the first stage's input buffer."""
        if x.shape != self.input.shape:
            raise ValueError(f"input shape {x.shape}, the bundle takes {self.input.shape}")
        np.copyto(self.input, x, casting="same_kind")

    def stage(self, k: int, evaluate: bool) -> list[Array]:
        """Run stage k; its passed-on tensors, then its exit tensor when evaluate is set."""
        return (self.full if evaluate else self.skip)[k].run()

    def runner(self, k: int, evaluate: bool) -> Callable[[], list[Array]]:
        """`stage(k, evaluate)` as a callable without arguments, for a precomputed plan."""
        return (self.full if evaluate else self.skip)[k].run

    def exit_value(self, k: int, outs: list[Array]) -> Array:
        """Stage k's exit features: its branch graph's output, or the stage's own last one."""
        branch = self.branches[k]
        return outs[-1] if branch is None else branch.run()[0]


class PlainChain:
    """The same interface through plain session.run (any shapes; a copy per tensor)."""

    def __init__(self, plan: StageSessions) -> None:
        self.input_name = plan.input_name
        self.sessions, self.branches = list(plan.sessions), list(plan.branches)
        self.fetch, self.passed = [list(f) for f in plan.fetch], [list(p) for p in plan.passed]
        self.feeds: dict[str, Array] = {}
        self.input_buffer: Array | None = None  # inputs are passed per call, not bound

    def load(self, x: Array) -> None:
        self.feeds = {self.input_name: x}

    def stage(self, k: int, evaluate: bool) -> list[Array]:
        outs: list[Array] = self.sessions[k].run(
            self.fetch[k] if evaluate else self.passed[k], self.feeds
        )
        self.feeds = dict(zip(self.passed[k], outs, strict=False))
        return outs

    def runner(self, k: int, evaluate: bool) -> Callable[[], list[Array]]:
        return functools.partial(self.stage, k, evaluate)

    def exit_value(self, k: int, outs: list[Array]) -> Array:
        branch = self.branches[k]
        if branch is None:
            return outs[-1]
        value: Array = branch.run(None, self.feeds)[0]
        return value


class Chain(Protocol):
    """How StagedModel.predict runs stages: load one input, run stage k, read its exit.

    input_buffer is the first stage's bound input tensor, which a caller may fill in place
    instead of calling load; None when the chain takes its input per call.
    """

    input_buffer: Array | None

    def load(self, x: Array) -> None: ...
    def stage(self, k: int, evaluate: bool) -> list[Array]: ...
    def runner(self, k: int, evaluate: bool) -> Callable[[], list[Array]]: ...
    def exit_value(self, k: int, outs: list[Array]) -> Array: ...


def make_chain(plan: StageSessions) -> Chain:
    """A BoundChain where every shape is fixed, else a PlainChain (one log line says why)."""
    try:
        return BoundChain(plan)
    except ValueError as exc:
        log.info("stages run through session.run, not bound buffers: %s", exc)
        return PlainChain(plan)
