"""`edgefleet optimize --task detect`: fp32 YOLO-class ONNX + detection data -> signed INT8 bundle.

The order is fixed: prepare (the classifier's: fixed input, opset, unique node names,
quant_pre_process), check the outputs against the declared decoder, measure fp32 on
validation, quantize with accuracy control on validation mAP@0.5 (or, for unlabelled data,
on agreement with fp32's detections), write and verify the bundle, then evaluate the test
split through the agent's runtime (never used for a choice) and time fp32 against INT8.

Detections are scored in frame pixels (the decoder's input-pixel boxes mapped back with the
agent's own geometry), against ground truth at COCO's evaluation threshold (EVAL_SCORE) so
mAP ranks every box the model proposes, as every YOLO validator does; the bundle keeps the
deployment thresholds given on the command line.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet.agent import __version__
from edgefleet.agent.bundle import (
    ManifestBody,
    Metrics,
    OperatingPoint,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
    verify_bundle,
    write_bundle,
)
from edgefleet.agent.bundle.manifest import Detection, Gate
from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.decode import DecodeError, decode
from edgefleet.agent.detect.geometry import Letterbox
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey
from edgefleet.server.reference.video import read_video

from ..data import check_channels
from ..errors import DataError, ModelError, OutputExistsError
from ..guard import check_collapse, compare_outputs, input_stats
from ..latency import compare
from ..macs import total_macs
from ..options import use_reduce_range
from ..prepare import prepare_model
from ..quantize import QUANTIZABLE
from ..report import write_json
from ..runner import make_session, run_outputs
from .accuracy import quantize_for_metric
from .data import DetectionData, load_detection
from .gates import ALWAYS, calibrate, read_truth
from .golden import write_detect_bundle_with_health
from .metrics import agreement_map50, coco_map
from .options import DetectOptions
from .report import write_detect_plot

Progress = Callable[[str], None]
F32 = npt.NDArray[np.float32]
# COCO's and Ultralytics' validation threshold: mAP integrates over every proposed box.
EVAL_SCORE = 0.001


def _load_model(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc


def _static_shape(model: onnx.ModelProto, name: str) -> list[int]:
    for vi in [*model.graph.output, *model.graph.value_info]:
        if vi.name == name:
            return [
                d.dim_value if d.HasField("dim_value") else -1
                for d in vi.type.tensor_type.shape.dim
            ]
    return []


def model_classes(
    model: onnx.ModelProto, spec: Detection, input_hw: tuple[int, int], source: str
) -> int:
    """Class count implied by the declared decoder; ModelError when the outputs do not fit it."""
    names = [o.name for o in model.graph.output]
    unknown = [o for o in spec.outputs if o not in names]
    if unknown:
        raise ModelError(f"{source}: declared output(s) {unknown} not among the model's {names}")
    if len(spec.outputs) != 1:
        raise ModelError(
            f"{source}: decoder {spec.decoder} reads one output, {spec.outputs} declared"
        )
    shape = _static_shape(model, spec.outputs[0])
    what = f"{source}: output {spec.outputs[0]!r} has shape {shape}; decoder {spec.decoder}"
    if len(shape) != 3 or shape[0] not in (1, -1) or min(shape[1:]) < 1:
        raise ModelError(f"{what} expects a 3-D (1, ., .) tensor")
    if spec.decoder == "yolov8":
        width = shape[1] if spec.layout == "attributes_first" else shape[2]
        form = "(1, 4 + C, N)" if spec.layout == "attributes_first" else "(1, N, 4 + C)"
        if width < 5:
            raise ModelError(f"{what} ({spec.layout}) expects {form} with C >= 1")
        return width - 4
    rows = sum(-(-input_hw[0] // s) * -(-input_hw[1] // s) for s in spec.strides)
    if shape[2] < 6 or shape[1] != rows:
        raise ModelError(
            f"{what} expects (1, N, 5 + C) with N = {rows} rows (the grids of strides "
            f"{spec.strides} over {input_hw[0]}x{input_hw[1]}) and C >= 1"
        )
    return shape[2] - 5


def _frame_dets(
    raw: Sequence[npt.NDArray[Any]],
    spec: Detection,
    labels: list[str],
    pre: Preprocessing,
    frame_hw: tuple[int, int],
    threshold: float | None,
) -> Detections:
    hw = (pre.height, pre.width)
    try:
        dets = decode(raw, spec, labels, hw, score_threshold=threshold)
    except DecodeError as exc:
        raise ModelError(str(exc)) from None
    return Letterbox.from_spec(frame_hw, pre).detections_to_frame(dets)


class _Evaluator:
    """One model's detections on one split: decode every frame at two thresholds."""

    def __init__(
        self, data: DetectionData, x: dict[str, F32], spec: Detection, pre: Preprocessing
    ) -> None:
        self.data, self.x, self.spec, self.pre = data, x, spec, pre

    def raw(self, model: onnx.ModelProto, split: str) -> list[npt.NDArray[np.generic]]:
        return run_outputs(model, self.x[split], self.spec.outputs)

    def dets(
        self, raw: list[npt.NDArray[np.generic]], split: str, threshold: float | None
    ) -> list[Detections]:
        frames = self.data.images[split]
        return [
            _frame_dets(
                [r[i : i + 1] for r in raw],
                self.spec,
                self.data.names,
                self.pre,
                f.shape[:2],
                threshold,
            )
            for i, f in enumerate(frames)
        ]


def optimize_detector(
    model_path: Path,
    data_path: Path,
    out_dir: Path,
    pre: Preprocessing,
    spec: Detection,
    key: FleetKey,
    opts: DetectOptions,
    progress: Progress = print,
) -> dict[str, Any]:
    """Run the detector optimizer; returns the report also written to out_dir/report.json."""
    if out_dir.exists():
        raise OutputExistsError(f"{out_dir}: output directory exists; choose a new one")
    t_start = time.monotonic()
    source_bytes = model_path.read_bytes() if model_path.is_file() else b""
    progress(f"[1/6] preparing {model_path.name}")
    prepared = prepare_model(
        _load_model(model_path),
        str(model_path),
        channels=pre.channels,
        height=pre.height,
        width=pre.width,
        layout=pre.layout,
        classifier=False,
    )
    for step in prepared.steps:
        progress(f"      {step}")
    fp32 = prepared.model
    classes = model_classes(fp32, spec, (pre.height, pre.width), str(model_path))
    data = load_detection(data_path, classes, opts.labels)
    check_channels(data, pre, opts.color_given)  # type: ignore[arg-type]
    mode = "labelled" if data.labelled else "unlabelled"
    progress(f"      {classes} class(es), {mode} data: {data.sizes()}, boxes {data.boxes()}")
    prep = Preprocessor(pre)
    x = {
        s: np.concatenate([prep(f) for f in fr]).astype(np.float32) for s, fr in data.images.items()
    }
    ev = _Evaluator(data, x, spec, pre)

    fp32_raw = {s: ev.raw(fp32, s) for s in ("validation", "test")}
    # fp32's deployed detections: the reference of agreement (and, unlabelled, the truth).
    fp32_ref = {s: ev.dets(fp32_raw[s], s, None) for s in fp32_raw}
    fp32_eval = {s: ev.dets(fp32_raw[s], s, EVAL_SCORE) for s in fp32_raw}

    def truth(split: str) -> list[Detections]:
        t = data.truth[split]
        return fp32_ref[split] if t is None else t

    fp32_map = {s: coco_map(fp32_eval[s], truth(s)) for s in fp32_raw}
    reference = fp32_map["validation"].map50
    metric_name = "mAP@0.5" if data.labelled else "agreement mAP@0.5 with fp32"
    progress(f"[2/6] fp32 validation {metric_name} {reference:.4f}")

    def score(q: onnx.ModelProto) -> float:
        dets = ev.dets(ev.raw(q, "validation"), "validation", EVAL_SCORE)
        return coco_map(dets, truth("validation")).map50

    def first_check(q: onnx.ModelProto) -> None:
        agreement = compare_outputs(
            fp32_raw["validation"], ev.raw(q, "validation"), classifier=False
        )
        qinfo["output_agreement"] = agreement.to_report()
        check_collapse(
            agreement,
            calib_stats=input_stats(x["calibration"]),
            val_stats=input_stats(x["validation"]),
        )

    qinfo: dict[str, Any] = {"mode": opts.quantization}
    progress(f"[3/6] quantization: {opts.quantization}, budget {opts.max_drop:g} mAP points")
    if opts.quantization == "static":
        rr = use_reduce_range(opts.reduce_range)
        keep_float = decode_tail(fp32)  # the in-graph box decode stays fp32 (docstring)
        outcome = quantize_for_metric(
            fp32,
            prepared.input_name,
            x["calibration"],
            score,
            reference=reference,
            max_drop_points=opts.max_drop,
            method=opts.calibration,
            reduce_range=rr,
            first_check=first_check,
            keep_float=keep_float,
            progress=lambda m: progress("      " + m),
        )
        qmodel = outcome.model
        qinfo["float_decode_tail"] = keep_float
        qinfo.update(
            outcome.to_report(),
            method=opts.calibration,
            reduce_range=rr,
            per_channel=True,
            calibration_images=len(x["calibration"]),
        )
    else:
        qmodel = fp32
        qinfo.update(val_metric=reference, reference_val_metric=reference, drop_points=0.0)
    progress(f"      INT8 validation {metric_name} {qinfo['val_metric']:.4f}")

    progress("[4/6] writing and verifying the signed bundle")
    model_id = opts.model_id or _model_id(model_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:

        def assemble(
            where: Path,
            metrics: Metrics,
            points: list[OperatingPoint],
            default: int,
            golden: bool = False,
        ) -> Any:
            body = ManifestBody(
                model_id=model_id,
                version=opts.version,
                created_ts=time.time(),
                input=TensorSpec(name=prepared.input_name, shape=list(prepared.input_shape)),
                preprocessing=pre,
                task="detect",
                detection=spec,
                labels=data.names,
                stages=[
                    Stage(
                        file="stage0.onnx",
                        inputs=[prepared.input_name],
                        outputs=[],
                        exit=None,
                        macs=total_macs(qmodel),
                    )
                ],
                operating_points=points,
                default_operating_point=default,
                provenance=Provenance(
                    source_model_sha256=hashlib.sha256(source_bytes).hexdigest(),
                    source_model_name=model_path.name,
                    optimizer=_optimizer_record(opts),
                    calibration=f"{len(x['calibration'])} images of the calibration split of "
                    f"{data_path}",
                    tool=f"edgefleet {__version__}",
                ),
                metrics=metrics,
                # Filled in by the golden writer for the shipped bundle (golden.py).
                health=None,
            )
            files = {"stage0.onnx": qmodel.SerializeToString()}
            if not golden:
                return write_bundle(where, body, files, key.private)
            # The device's pre-switch check: golden boxes on validation inputs, recorded
            # through the agent's DetectorModel from this very bundle.
            return write_detect_bundle_with_health(where, body, files, key.private, x["validation"])

        always = [OperatingPoint(name=ALWAYS, thresholds=[], gate=None, skip_fraction=0.0)]
        assemble(tmp / "draft", Metrics(), always, 0)
        draft = verify_bundle(tmp / "draft", [key.public])
        points, default, gate_report = always, 0, None
        if opts.gate_clip is not None:
            progress(f"      calibrating the motion gate on {opts.gate_clip}")
            points, default, gate_report = _gates(draft, opts)
            for p in points:
                progress(
                    f"      point {p.name}: motion {p.gate.motion if p.gate else None}, "
                    f"skips {p.skip_fraction:.1%}, recall {p.val_recall:.4f}"
                )
        report = _evaluate(
            draft, fp32, qmodel, ev, fp32_eval, fp32_ref, fp32_map, truth, opts, progress
        )
        shutil.rmtree(tmp / "draft")
        manifest = assemble(tmp / "bundle", _metrics(report), points, default, golden=True)
        verify_bundle(tmp / "bundle", [key.public])
        report.update(
            task="detect",
            mode=mode,
            metric=metric_name,
            model={
                "path": str(model_path),
                "sha256": manifest.provenance.source_model_sha256,
                "classes": classes,
                "input_shape": prepared.input_shape,
                "macs": total_macs(fp32),
                "prepared": prepared.steps,
            },
            detection=spec.model_dump(),
            data={
                "source": str(data_path),
                "sizes": data.sizes(),
                "boxes": data.boxes(),
                **data.provenance,
            },
            budget={
                "max_drop_points": opts.max_drop,
                "metric": metric_name,
                "reference_val_metric": reference,
                "val_metric": qinfo["val_metric"],
                "drop_points": 100 * (reference - qinfo["val_metric"]),
                "within": 100 * (reference - qinfo["val_metric"]) <= opts.max_drop + 1e-9,
            },
            quantization=qinfo,
            gate=gate_report,
            decisions=_decisions(qinfo, data.labelled),
            bundle={
                "path": str(out_dir / "bundle"),
                "model_id": model_id,
                "version": opts.version,
                "key_id": key.id,
                "health": None if manifest.health is None else manifest.health.model_dump(),
            },
            seconds=round(time.monotonic() - t_start, 1),
        )
        (tmp / "models").mkdir()
        onnx.save(fp32, tmp / "models" / "fp32.onnx")
        onnx.save(qmodel, tmp / "models" / f"{opts.quantization}.onnx")
        write_json(report, tmp / "report.json")
        write_detect_plot(report, tmp / "report.png")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"done in {report['seconds']} s: {out_dir}/bundle, report.json, report.png")
    return report


def _evaluate(
    verified: Any,
    fp32: onnx.ModelProto,
    qmodel: onnx.ModelProto,
    ev: _Evaluator,
    fp32_eval: dict[str, list[Detections]],
    fp32_ref: dict[str, list[Detections]],
    fp32_map: dict[str, Any],
    truth: Callable[[str], list[Detections]],
    opts: DetectOptions,
    progress: Progress,
) -> dict[str, Any]:
    """mAP on validation and test (test through the signed bundle), agreement, latency."""
    progress("[5/6] validation and test mAP (test through the agent runtime)")
    staged = StagedModel(verified, threads=opts.threads)
    xt = ev.x["test"]
    q_raw_test = [[np.array(o) for o in staged.raw_outputs(xt[i : i + 1])] for i in range(len(xt))]
    stacked = [np.concatenate([r[k] for r in q_raw_test]) for k in range(len(ev.spec.outputs))]
    q_raw = {"validation": ev.raw(qmodel, "validation"), "test": stacked}
    figures: dict[str, Any] = {}
    for split in ("validation", "test"):
        q_eval = ev.dets(q_raw[split], split, EVAL_SCORE)
        q_ref = ev.dets(q_raw[split], split, None)
        q_map = coco_map(q_eval, truth(split))
        figures[split] = {
            "fp32": fp32_map[split].to_report(),
            "int8": q_map.to_report(),
            "agreement_map50": agreement_map50(q_eval, fp32_ref[split]),
            "detections_fp32": int(sum(len(d) for d in fp32_ref[split])),
            "detections_int8": int(sum(len(d) for d in q_ref)),
        }
        progress(
            f"      {split}: mAP@0.5 fp32 {fp32_map[split].map50:.4f} INT8 {q_map.map50:.4f}, "
            f"mAP@0.5:0.95 fp32 {fp32_map[split].map50_95:.4f} INT8 {q_map.map50_95:.4f}, "
            f"agreement {figures[split]['agreement_map50']:.4f}"
        )
    progress(f"[6/6] latency, {opts.threads} thread(s), interleaved medians")
    n = min(opts.latency_samples, len(xt))
    samples = [xt[i : i + 1] for i in range(n)]
    sf, sq = make_session(fp32, opts.threads), make_session(qmodel, opts.threads)
    nf, nq = sf.get_inputs()[0].name, sq.get_inputs()[0].name
    lat = compare(
        {
            "fp32": lambda s: sf.run(None, {nf: s}),
            "int8": lambda s: sq.run(None, {nq: s}),
            "int8_bundle": staged.raw_outputs,
        },
        samples,
        rounds=opts.latency_rounds,
        warmup=min(n, 5),
    )
    progress("      latency ms: " + ", ".join(f"{k} {v:.3f}" for k, v in lat.items()))
    return {
        "validation": figures["validation"],
        "test": figures["test"],
        "latency_ms": lat,
        "threads": opts.threads,
        "latency_samples": n,
        "ratios": {"int8_speedup": lat["fp32"] / lat["int8"]},
        "sizes": {
            "fp32_bytes": len(fp32.SerializeToString()),
            "int8_bytes": len(qmodel.SerializeToString()),
            "bundle_bytes": sum(f.size for f in verified.manifest.files.values()),
        },
    }


def decode_tail(model: onnx.ModelProto) -> list[str]:
    """Nodes after the last weighted layer on every path: the box decode and score activation
    a detector's exporter put in the graph (grid offsets, exp, sigmoid, concat).

    They stay fp32, like a classifier's head: their MACs are nil, and quantizing them only
    adds Q/DQ pairs and rounds box pixels and scores. One uint8 scale across a tensor of box
    pixels (0-640) and probabilities (0-1) rounded nudenet's YOLOv8n scores to 0 or 1.24
    (all-INT8 agreement 0.87, no Conv fallback could help); on the reference detector the
    quantized sigmoid and offsets cost 2.2 mAP points with every Conv back in fp32.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    feeds_weighted: dict[str, bool] = {}

    def reaches(node: onnx.NodeProto) -> bool:
        # Whether a weighted layer lies downstream of this node (memoised, iterative order).
        key = node.name
        if key in feeds_weighted:
            return feeds_weighted[key]
        feeds_weighted[key] = False  # a cycle cannot occur in ONNX; guards recursion anyway
        result = any(
            n.op_type in QUANTIZABLE or reaches(n)
            for out in node.output
            for n in consumers.get(out, [])
        )
        feeds_weighted[key] = result
        return result

    return [n.name for n in model.graph.node if n.op_type not in QUANTIZABLE and not reaches(n)]


def _gates(draft: Any, opts: DetectOptions) -> tuple[list[OperatingPoint], int, dict[str, Any]]:
    """Gate operating points calibrated on opts.gate_clip (server/optimize/detect/gates.py)."""
    assert opts.gate_clip is not None
    try:
        frames = read_video(opts.gate_clip)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"--gate-clip {opts.gate_clip}: {exc}") from exc
    truth = None if opts.gate_truth is None else read_truth(opts.gate_truth, len(frames))
    return calibrate(
        draft, list(frames), truth, opts.gate_max_drop, Gate(max_skip=opts.gate_max_skip)
    )


def _metrics(report: dict[str, Any]) -> Metrics:
    test = report["test"]
    return Metrics(
        latency_ms={k: float(v) for k, v in report["latency_ms"].items()},
        extra={
            "map50": test["int8"]["map50"],
            "map50_95": test["int8"]["map50_95"],
            "agreement_map50": test["agreement_map50"],
            "fp32_map50": test["fp32"]["map50"],
            "fp32_map50_95": test["fp32"]["map50_95"],
            "test_images": float(test["int8"]["images"]),
            "threads": float(report["threads"]),
        },
    )


def _decisions(qinfo: dict[str, Any], labelled: bool) -> list[str]:
    what = "validation mAP@0.5" if labelled else "agreement mAP@0.5 with fp32 (unlabelled data)"
    out = [f"budget measured on {what}; test figures are reported only"]
    if qinfo["mode"] == "none":
        return [*out, "no quantization asked: the fp32 model ships"]
    if qinfo.get("excluded"):
        out.append(
            f"all-INT8 missed the budget; {len(qinfo['excluded'])} most sensitive node(s) "
            f"back in fp32: {qinfo['excluded']}"
        )
    else:
        out.append("all-INT8 within the budget: every quantizable node in INT8")
    return out


def _optimizer_record(
    opts: DetectOptions,
) -> dict[str, str | int | float | bool | list[str] | None]:
    return {
        "task": "detect",
        "quantization": opts.quantization,
        "calibration": opts.calibration,
        "reduce_range": opts.reduce_range,
        "max_drop_map_points": opts.max_drop,
    }


def _model_id(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in path.stem).strip("-._")
    return (stem or "model")[:64]
