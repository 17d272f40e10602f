"""Per-node time of the fp32 and the INT8 model on this machine, and the speed fallback.

Accuracy control keeps layers fp32 where INT8 loses accuracy; this keeps them fp32 where INT8
loses *time*. Without VNNI a depthwise QLinearConv or a QLinearMul can be slower than its
float kernel, and Q/DQ bounces around float islands (HardSigmoid, Div, ConvTranspose) cost
more than the int8 kernel saves; which nodes lose depends on the machine, so it is measured.

onnxruntime's profiler gives one event per executed node of the *optimized* graph (fused
QLinearConv, NCHWc convs named after their output, layout Transposes, leftover Q/DQ). Each is
attributed to a node of the fp32 source graph: by name (suffixes onnxruntime adds stripped),
or by the tensor it writes; glue nodes (QuantizeLinear, DequantizeLinear, Transpose, NCHWc
reorders) are charged to the node whose precision or layout made them necessary: a
QuantizeLinear or ReorderInput to the node it feeds, a DequantizeLinear or ReorderOutput to
the node whose output it converts. A node is slower in INT8 when its INT8 time with that glue
exceeds its fp32 time. Only timing decides; keeping a node fp32 can only help accuracy.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from edgefleet.agent.runtime.session import session_options

from .latency import interleaved, round_ratios
from .quantize import Method, quantize_qdq

F32 = npt.NDArray[np.float32]
# Source node name -> median microseconds per inference.
Times = dict[str, float]
# Nodes whose kernels move data between precisions or layouts rather than compute.
_TOWARD_CONSUMER = ("QuantizeLinear", "ReorderInput")
_TOWARD_PRODUCER = ("DequantizeLinear", "ReorderOutput")
_GLUE = (*_TOWARD_CONSUMER, *_TOWARD_PRODUCER, "Transpose")
# Suffixes onnxruntime's graph transformers append to node and tensor names.
_SUFFIX = re.compile(
    r"(_token_\d+|_quant|_nchwc|_QuantizeLinear(_Output)?|_DequantizeLinear|/\w+Fusion)$"
)
# Kernels that absorb the elementwise ops after them (Conv+BN+Relu -> one FusedConv, named
# by NCHWc after the Relu's output): their time belongs to the conv, not to the Relu.
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ABSORBED = ("Relu", "Clip", "BatchNormalization", "Add", "Sigmoid", "HardSigmoid", "LeakyRelu")
UNATTRIBUTED = "(unattributed)"
# A node counts as slower in INT8 only beyond this margin and this many microseconds: the
# profiler's per-node medians still carry a few percent of noise on a shared machine.
SLOWER_MARGIN = 0.10
SLOWER_MIN_US = 5.0


@dataclass
class Profile:
    """Median microseconds per run of each executed node of the optimized graph."""

    node_us: dict[str, float]
    op_type: dict[str, str]
    runs: int
    # Executed nodes whose first input is 8-bit: the kernels that run in INT8.
    int8_kernels: set[str] = field(default_factory=set)


@dataclass
class Attribution:
    """Profile time charged to the fp32 graph's nodes."""

    total_us: Times
    glue_us: Times  # the part of total_us spent in Q/DQ and layout glue
    int8: set[str]  # source nodes with an INT8 kernel of their own


@dataclass
class NodeTiming:
    """Per source node: fp32 and INT8 microseconds, and the nodes INT8 makes slower."""

    fp32_us: Times
    int8_us: Times
    slower: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def profile_model(
    model: onnx.ModelProto, samples: F32, threads: int, *, warmup: int = 3
) -> tuple[Profile, onnx.ModelProto]:
    """Run each sample through a profiled session; node medians and the optimized graph.

    The first `warmup` runs are dropped (allocations, first-touch of weights); per node the
    median over the remaining runs resists a neighbour's burst better than a sum.
    """
    if samples.shape[0] == 0:
        raise ValueError("profile_model: no samples")
    with tempfile.TemporaryDirectory(prefix="edgefleet-prof-") as tmp:
        opts = session_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # Saving an NCHWc-optimized graph warns that it is machine specific: it is read once
        # here, on this machine, for its node names only.
        opts.log_severity_level = 3
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        name = sess.get_inputs()[0].name
        runs = max(samples.shape[0], warmup + 1)
        for i in range(runs):
            k = i % samples.shape[0]
            sess.run(None, {name: samples[k : k + 1]})
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized = onnx.load(Path(tmp) / "optimized.onnx")
    return parse_profile(events, warmup), optimized


def parse_profile(events: Sequence[Mapping[str, Any]], warmup: int = 0) -> Profile:
    """Node medians from onnxruntime's profiler JSON (a list of chrome-trace events).

    Node events are `cat: Node` with name `<node>_kernel_time`, `dur` in microseconds and
    `args.op_name`; each node appears once per run, so its k-th event belongs to run k.
    """
    durations: dict[str, list[float]] = defaultdict(list)
    op_type: dict[str, str] = {}
    int8: set[str] = set()
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        durations[node].append(float(event["dur"]))
        args = event.get("args", {})
        op_type[node] = str(args.get("op_name", ""))
        inputs = args.get("input_type_shape") or [{}]
        if any(t in ("uint8", "int8") for t in inputs[0]):
            int8.add(node)
    kept = {k: v[warmup:] or v for k, v in durations.items()}
    runs = max((len(v) for v in kept.values()), default=0)
    medians = {k: statistics.median(v) for k, v in kept.items()}
    return Profile(medians, op_type, runs, int8)


def _strip(name: str) -> str:
    while True:
        short = _SUFFIX.sub("", name)
        if short == name:
            return name
        name = short


def attribute(profile: Profile, optimized: onnx.ModelProto, source: onnx.ModelProto) -> Attribution:
    """Profile time per source node, and the glue part of it, walking the optimized graph.

    Every profiled microsecond lands on one source node (or is split evenly between the
    nodes a shared glue node serves), or on UNATTRIBUTED when no walk reaches one.
    """
    names: set[str] = {str(n.name) for n in source.graph.node if n.name}
    tensor_owner: dict[str, str] = {
        str(o): str(n.name) for n in source.graph.node for o in n.output if n.name
    }
    by_name = {n.name: n for n in source.graph.node if n.name}
    nodes = {n.name: n for n in optimized.graph.node}
    producer = {o: n.name for n in optimized.graph.node for o in n.output}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in optimized.graph.node:
        for i in n.input:
            consumers[i].append(n.name)

    def anchor(found: str, opt_op: str) -> str:
        """A fused conv-like kernel named after an absorbed op: walk back to its conv."""
        if not any(c in opt_op for c in _COMPUTE):
            return found
        node = by_name[found]
        while node.op_type in _ABSORBED and node.input and node.input[0] in tensor_owner:
            node = by_name[tensor_owner[node.input[0]]]
        return str(node.name) if any(c in node.op_type for c in _COMPUTE) else found

    def direct(opt_name: str) -> str | None:
        node = nodes.get(opt_name)
        op = node.op_type if node is not None else profile.op_type.get(opt_name, "")
        if op in _GLUE and opt_name not in names:
            return None
        for candidate in (opt_name, _strip(opt_name)):
            if candidate in names:
                return anchor(candidate, op)
            if candidate in tensor_owner:
                return anchor(tensor_owner[candidate], op)
        # NCHWc names a rewritten node "<source>_<tensor>_nchwc": the longest source prefix.
        short = _strip(opt_name)
        prefixes = [n for n in names if short.startswith(n + "_")]
        if prefixes:
            return anchor(max(prefixes, key=len), op)
        if node is not None:
            for out in node.output:
                owner = tensor_owner.get(out) or tensor_owner.get(_strip(out))
                if owner:
                    return anchor(owner, op)
        return None

    def walk(opt_name: str, toward_consumer: bool, seen: set[str]) -> list[str]:
        """Source nodes reached through glue nodes in one direction."""
        node = nodes.get(opt_name)
        if node is None or opt_name in seen:
            return []
        seen.add(opt_name)
        if toward_consumer:
            nxt = [c for o in node.output for c in consumers.get(o, [])]
        else:
            nxt = [producer[i] for i in node.input[:1] if i in producer]
        found: list[str] = []
        for other in nxt:
            hit = direct(other)
            found.extend([hit] if hit else walk(other, toward_consumer, seen))
        return found

    total: Times = defaultdict(float)
    glue: Times = defaultdict(float)
    int8: set[str] = set()
    for opt_name, us in profile.node_us.items():
        hit = direct(opt_name)
        if hit:
            total[hit] += us
            if opt_name in profile.int8_kernels:
                int8.add(hit)
            continue
        op = profile.op_type.get(opt_name, "")
        first = op in _TOWARD_CONSUMER
        owners = walk(opt_name, first, set()) or walk(opt_name, not first, set())
        owners = sorted(set(owners)) or [UNATTRIBUTED]
        for owner in owners:  # shared glue (one Q feeding two convs) is split evenly
            total[owner] += us / len(owners)
            glue[owner] += us / len(owners)
    return Attribution(dict(total), dict(glue), int8)


def decide(
    fp32_us: Times,
    int8_us: Times,
    candidates: set[str],
    *,
    margin: float = SLOWER_MARGIN,
    min_us: float = SLOWER_MIN_US,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Candidates slower in INT8 (slowest loss first), and a per-node report row."""
    rows: dict[str, dict[str, Any]] = {}
    losses: dict[str, float] = {}
    for node in sorted(set(fp32_us) | set(int8_us)):
        f, q = fp32_us.get(node, 0.0), int8_us.get(node, 0.0)
        slower = node in candidates and q > f * (1 + margin) and q - f > min_us
        if slower:
            losses[node] = q - f
        decision = "fp32" if slower else ("int8" if node in candidates else "float op")
        rows[node] = {"fp32_us": round(f, 1), "int8_us": round(q, 1), "decision": decision}
    return sorted(losses, key=lambda n: -losses[n]), rows


def slower_in_int8(
    fp32: onnx.ModelProto, qdq: onnx.ModelProto, samples: F32, threads: int
) -> NodeTiming:
    """Profile both models on this machine and name the quantized nodes INT8 makes slower."""
    p32, opt32 = profile_model(fp32, samples, threads)
    p8, opt8 = profile_model(qdq, samples, threads)
    fp32_us = attribute(p32, opt32, fp32).total_us
    int8 = attribute(p8, opt8, fp32)
    # Only nodes the quantizer can keep fp32: an 8-bit kernel of their own in the QDQ model.
    candidates = int8.int8 & {n.name for n in qdq.graph.node}
    slower, rows = decide(fp32_us, int8.total_us, candidates)
    for node, row in rows.items():
        row["int8_glue_us"] = round(int8.glue_us.get(node, 0.0), 1)
    int8_us = int8.total_us
    report = {
        "threads": threads,
        "runs": min(p32.runs, p8.runs),
        "fp32_total_us": round(sum(p32.node_us.values()), 1),
        "int8_total_us": round(sum(p8.node_us.values()), 1),
        "nodes": rows,
        "slower": slower,
    }
    return NodeTiming(fp32_us, int8_us, slower, report)


Progress = Callable[[str], None]
Timer = Callable[[onnx.ModelProto, onnx.ModelProto, F32, int], NodeTiming]
Ratio = Callable[[onnx.ModelProto, onnx.ModelProto, F32, int, int], float]


def side_by_side(
    a: onnx.ModelProto, b: onnx.ModelProto, samples: F32, threads: int, rounds: int
) -> float:
    """Median over interleaved rounds of b's time over a's (below 1: b is faster).

    Paired round by round (`round_ratios`), so a neighbour's burst slows both alike.
    """
    from .runner import make_session

    runners: dict[str, Callable[[F32], object]] = {}
    for key, model in (("a", a), ("b", b)):
        sess = make_session(model, threads)
        name = sess.get_inputs()[0].name
        runners[key] = _runner(sess, name)
    items = [samples[i : i + 1] for i in range(samples.shape[0])]
    per_round = interleaved(runners, items, rounds=rounds, chunk=4, warmup=min(3, len(items)))
    return statistics.median(round_ratios(per_round, "b", "a"))


def _runner(sess: ort.InferenceSession, name: str) -> Callable[[F32], object]:
    return lambda x: sess.run(None, {name: x})


def speed_fallback(
    fp32: onnx.ModelProto,
    input_name: str,
    calibration: F32,
    exclude_already: Sequence[str] = (),
    *,
    samples: F32 | None = None,
    threads: int = 1,
    method: Method = "minmax",
    reduce_range: bool = False,
    cache: Path | None = None,
    rounds: int = 5,
    min_gain: float = 0.02,
    max_passes: int = 3,
    timer: Timer = slower_in_int8,
    ratio: Ratio = side_by_side,
    progress: Progress = lambda _m: None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """INT8 model with the nodes INT8 makes slower kept fp32, if the whole model gains.

    Quantizes with `exclude_already` (accuracy control's fp32 layers and the float head),
    profiles it against fp32, re-quantizes with the slower nodes also excluded, and keeps that
    only if it is at least `min_gain` faster side by side at `threads`. If not, two smaller
    sets get a try: the slower weight layers only (an elementwise node kept fp32 often just
    moves its Q/DQ onto its neighbours), then the bigger half of the losses. Up to
    `max_passes` rounds, since keeping a node fp32 moves glue onto its neighbours. samples
    default to the first 16 calibration images. Every excluded node only widens the fp32 part,
    so accuracy can only improve. The report lists every try with its time ratio.
    """
    timed = samples if samples is not None else calibration[:16]
    excluded = list(exclude_already)
    ops = {n.name: n.op_type for n in fp32.graph.node}
    report: dict[str, Any] = {"threads": threads, "passes": [], "speed_excluded": []}
    with contextlib.ExitStack() as stack:
        if cache is None:
            # Every try re-quantizes: one calibration pass in all, as in accuracy control.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="edgefleet-speed-"))
            cache = Path(tmp) / "ranges.json"

        def quantize(extra: Sequence[str]) -> onnx.ModelProto:
            return quantize_qdq(
                fp32,
                input_name,
                calibration,
                method=method,
                exclude=[*excluded, *extra],
                reduce_range=reduce_range,
                cache=cache,
            )

        model = quantize([])
        for _ in range(max_passes):
            timing = timer(fp32, model, timed, threads)
            # A node already excluded can still look INT8 (onnxruntime moves a QuantizeLinear
            # above a MaxPool by itself): excluding it again would change nothing.
            slower = [n for n in timing.slower if n not in excluded]
            entry: dict[str, Any] = {"slower": slower, "timing": timing.report, "tried": []}
            report["passes"].append(entry)
            tries = [slower] if slower else []
            compute = [n for n in slower if ops.get(n) in _COMPUTE]
            for subset in (compute, slower[: len(slower) // 2]):
                if subset and subset not in tries:
                    tries.append(subset)
            accepted = False
            for nodes in tries:
                candidate = quantize(nodes)
                r = ratio(model, candidate, timed, threads, rounds)
                entry["tried"].append({"nodes": list(nodes), "time_ratio": r})
                progress(f"speed fallback: {len(nodes)} node(s) fp32, time x{r:.3f}")
                if r <= 1 - min_gain:
                    model, accepted = candidate, True
                    excluded.extend(nodes)
                    report["speed_excluded"].extend(nodes)
                    break
            if not accepted:
                break
    report["excluded"] = excluded
    return model, report
