"""`edgefleet optimize`: fp32 ONNX classifier + labelled images -> signed INT8 early-exit bundle."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import CliError
from .keys import KEYS_DIR_HELP


def register(sub: Any) -> None:
    """Add `optimize` to the command tree."""
    p = sub.add_parser(
        "optimize",
        help="quantize, add early exits, sign: an fp32 ONNX classifier becomes a device bundle",
        description=__doc__,
    )
    p.add_argument("model", type=Path, help="fp32 ONNX image classifier (or detector: --task)")
    p.add_argument(
        "--task",
        choices=["classify", "detect"],
        default="classify",
        help="detect: a YOLO-class detector, INT8 within a validation mAP budget, no exits "
        "(data: <split>_images and <split>_boxes rows [image, class, x1, y1, x2, y2])",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder split/label/image (or label/image), or .npz: uint8 or float images "
        "(N,H,W), (N,H,W,C) or (N,C,H,W) with <split>_images/<split>_labels, x_<split>/y_<split>, "
        "images/labels, x/y, data/target, ... (docs/optimize.md, Data); 3-channel arrays are BGR "
        "unless the .npz holds color='RGB'",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="accepted accuracy drop (classify: 0.01 = 1 pt, the default; detect: validation "
        "mAP@0.5 points, default 1.0)",
    )
    p.add_argument(
        "--confidence",
        type=_confidence,
        default=0.9,
        help="the budget holds with this confidence: an upper bound of the drop on validation "
        "must stay within --max-drop (default 0.9); 'none' compares the measured drop only",
    )
    p.add_argument(
        "--labels",
        help="comma-separated class names in output order, or @file (one per line) "
        "(default: the labels found in the data, in natural order)",
    )
    g = p.add_argument_group("preprocessing (inferred from the model input where possible)")
    g.add_argument("--size", help="input HxW, or N for NxN (default: the model's fixed input)")
    g.add_argument(
        "--color",
        choices=["GRAY", "RGB", "BGR"],
        help="channel order the model expects (default: GRAY for 1 channel, else RGB); "
        "given, it also allows converting grey data for a colour model or the reverse",
    )
    g.add_argument(
        "--layout",
        choices=["NCHW", "NHWC"],
        help="input tensor layout (default: NHWC if the last dim is 1 or 3, else NCHW)",
    )
    g.add_argument("--mean", help="per-channel, comma-separated, after scaling (default: 0)")
    g.add_argument("--std", help="per-channel, comma-separated (default: 1)")
    g.add_argument("--scale", type=float, default=1 / 255, help="pixel multiplier (default: 1/255)")
    g.add_argument(
        "--resize",
        choices=["stretch", "letterbox", "center_crop"],
        default=None,
        help="how a frame of another shape is fitted to the input (default: stretch; "
        "letterbox for --task detect)",
    )
    g.add_argument(
        "--interpolation",
        choices=["nearest", "linear", "area", "cubic"],
        default="linear",
        help="resampling used when resizing",
    )
    q = p.add_argument_group("quantization")
    q.add_argument(
        "--quantization",
        choices=["static", "dynamic", "fp16", "none"],
        default="static",
        help="static: INT8 weights and activations, calibrated on the data",
    )
    q.add_argument(
        "--calibration",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="how static quantization picks activation ranges",
    )
    q.add_argument(
        "--speed-control",
        choices=["on", "off"],
        default="on",
        help="on: layers whose INT8 form is slower than fp32 on this machine stay fp32, "
        "kept only if the whole model gets faster (time the build where devices' CPUs are "
        "alike, or turn it off)",
    )
    q.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="7-bit weights; auto: on for x86 CPUs without VNNI",
    )
    p.add_argument(
        "--head-precision",
        choices=["float", "int8"],
        default="float",
        help="float: pooling and a small final linear layer stay fp32",
    )
    e = p.add_argument_group("early exits")
    e.add_argument("--exits", default="auto", help="auto, none, or comma-separated tensor names")
    e.add_argument(
        "--exit-rule",
        choices=["max_softmax", "entropy", "margin"],
        default="max_softmax",
        help="confidence an exit compares with its threshold",
    )
    e.add_argument(
        "--exit-grid", type=int, default=2, help="pool exit features to GxG (1 = global)"
    )
    e.add_argument(
        "--stage-layout",
        choices=["auto", "nchw", "nhwc"],
        default="auto",
        help="layout of uint8 tensors between stages (auto: nhwc for INT8, the CPU's own)",
    )
    c = p.add_argument_group("compression passes (each kept only within budget)")
    c.add_argument("--prune", type=float, default=0.0, help="fraction of conv channels (L1)")
    c.add_argument(
        "--low-rank", type=float, default=None, help="SVD energy to keep, e.g. 0.95 (default: off)"
    )
    c.add_argument(
        "--share", type=int, default=None, help="k-means clusters per weight channel (default: off)"
    )
    d = p.add_argument_group("detection (--task detect)")
    d.add_argument("--decoder", choices=["yolov8", "yolox"], help="raw output family (required)")
    d.add_argument(
        "--det-layout",
        choices=["attributes_first", "boxes_first"],
        default="attributes_first",
        help="yolov8: (1, 4+C, N) or (1, N, 4+C)",
    )
    d.add_argument("--strides", default="8,16,32", help="yolox: feature strides, in row order")
    d.add_argument("--score-threshold", type=float, default=0.25, help="deployed box threshold")
    d.add_argument("--nms-iou", type=float, default=0.45, help="IoU above which NMS drops a box")
    d.add_argument("--max-det", type=int, default=100, help="boxes kept per frame")
    d.add_argument("--class-agnostic", action="store_true", help="NMS across classes")
    d.add_argument(
        "--outputs", default=None, help="comma-separated output names (default: the model's)"
    )
    d.add_argument("--latency-samples", type=int, default=50, help="test frames timed")
    d.add_argument(
        "--gate-clip",
        type=Path,
        default=None,
        help="video from the camera (or like it): calibrates motion-gate operating points that "
        "skip the detector on still frames",
    )
    d.add_argument(
        "--gate-truth",
        type=Path,
        default=None,
        help='the clip\'s boxes, {"frames": [[{"class": c, "box": [x1, y1, x2, y2]}]]}; '
        "default: recall against the detector's own boxes on every frame",
    )
    d.add_argument(
        "--gate-max-drop", type=float, default=1.0, help="recall points the gate may cost"
    )
    d.add_argument("--gate-max-skip", type=int, default=30, help="frames skipped in a row at most")
    p.add_argument("--threads", type=int, default=1, help="threads for latency measurement")
    p.add_argument(
        "--model-id", default=None, help="model id in the manifest (default: the model file's name)"
    )
    p.add_argument(
        "--version",
        type=int,
        default=1,
        help="bundle version in the manifest (devices install only newer versions)",
    )
    p.add_argument("--keys-dir", type=Path, default=None, help=KEYS_DIR_HELP)
    p.set_defaults(func=_optimize)


def _confidence(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a number in (0, 1) or 'none'"
        ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a number in (0, 1) or 'none'")
    return value


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"--{what} {text!r}: expected comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise CliError(f"--{what} {text!r}: expected finite numbers")
    return values


def _labels(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            raise CliError(f"--labels @{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--labels @{path}: cannot read it as text ({exc})") from None
        names = [ln.strip() for ln in lines if ln.strip()]
        if not names:
            raise CliError(f"--labels @{path}: the file holds no label names")
        return names
    return [v.strip() for v in text.split(",")]


def _optimize(args: argparse.Namespace) -> int:
    if args.task == "detect":
        return _optimize_detect(args)
    if args.max_drop is None:
        args.max_drop = 0.01
    if args.resize is None:
        args.resize = "stretch"
    # Options are checked before the optimizer's imports (onnx, onnxruntime, scipy: seconds),
    # so a mistyped option is refused at once.
    labels = _labels(args.labels)
    mean, std = _floats(args.mean, "mean"), _floats(args.std, "std")
    if not args.data.exists():
        raise CliError(f"{args.data}: no such file or folder")
    from edgefleet.server.optimize.errors import OptimizeError
    from edgefleet.server.optimize.options import OptimizeOptions

    try:
        opts = OptimizeOptions(
            max_drop=args.max_drop,
            confidence=args.confidence,
            quantization=args.quantization,
            calibration=args.calibration,
            speed_control=args.speed_control,
            reduce_range=args.reduce_range,
            exits=args.exits if args.exits in ("auto", "none") else args.exits.split(","),
            exit_rule=args.exit_rule,
            exit_grid=args.exit_grid,
            head_precision=args.head_precision,
            stage_layout=args.stage_layout,
            prune=args.prune,
            low_rank=args.low_rank,
            share=args.share,
            threads=args.threads,
            model_id=args.model_id,
            version=args.version,
            labels=labels,
            color_given=args.color is not None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise CliError(f"{flag} {first.get('input')!r}: {first['msg']}") from None
    from edgefleet.server.optimize.preprocessing import infer_preprocessing

    try:
        spec = infer_preprocessing(
            args.model,
            size=args.size,
            color=args.color,
            layout=args.layout,
            mean=mean,
            std=std,
            scale=args.scale,
            resize=args.resize,
            interpolation=args.interpolation,
        )
    except OptimizeError as exc:
        raise CliError(str(exc)) from None
    # The optimizer pulls in onnx's quantization tools: only a run that gets this far pays.
    from edgefleet.server.keystore import init_key
    from edgefleet.server.optimize.pipeline import optimize
    from edgefleet.server.paths import keys_dir

    key, created = init_key(args.keys_dir or keys_dir())
    if created:
        print(f"created fleet key {key.id} in {key.directory}")
    try:
        optimize(args.model, args.data, args.out, spec, key, opts)
    except OptimizeError as exc:
        raise CliError(str(exc)) from None
    return 0


def _validated(make: Any) -> Any:
    """Build a pydantic options object; a refusal names the flag."""
    try:
        return make()
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "options"
        raise CliError(f"{flag} {first.get('input')!r}: {first['msg']}") from None


def _optimize_detect(args: argparse.Namespace) -> int:
    """--task detect: INT8 within a validation mAP budget, one stage, a signed bundle."""
    if args.decoder is None:
        raise CliError("--task detect needs --decoder yolov8|yolox (never guessed from shapes)")
    labels = _labels(args.labels)
    mean, std = _floats(args.mean, "mean"), _floats(args.std, "std")
    strides = _floats(args.strides, "strides") or []
    if not args.data.exists():
        raise CliError(f"{args.data}: no such file or folder")
    from edgefleet.agent.bundle.manifest import Detection
    from edgefleet.server.optimize.detect.options import DetectOptions
    from edgefleet.server.optimize.errors import OptimizeError

    opts = _validated(
        lambda: DetectOptions(
            max_drop=1.0 if args.max_drop is None else args.max_drop,
            quantization="none" if args.quantization == "none" else "static",
            calibration=args.calibration,
            reduce_range=args.reduce_range,
            threads=args.threads,
            latency_samples=args.latency_samples,
            model_id=args.model_id,
            version=args.version,
            labels=labels,
            color_given=args.color is not None,
            gate_clip=args.gate_clip,
            gate_truth=args.gate_truth,
            gate_max_drop=args.gate_max_drop,
            gate_max_skip=args.gate_max_skip,
        )
    )
    if args.quantization not in ("static", "none"):
        raise CliError(f"--quantization {args.quantization}: detectors take static or none")
    from edgefleet.server.optimize.preprocessing import infer_preprocessing

    try:
        spec = infer_preprocessing(
            args.model,
            size=args.size,
            color=args.color,
            layout=args.layout,
            mean=mean,
            std=std,
            scale=args.scale,
            resize=args.resize or "letterbox",
            interpolation=args.interpolation,
        )
        import onnx

        outputs = (
            args.outputs.split(",")
            if args.outputs
            else [o.name for o in onnx.load(args.model, load_external_data=False).graph.output]
        )
    except OptimizeError as exc:
        raise CliError(str(exc)) from None
    detection = _validated(
        lambda: Detection(
            decoder=args.decoder,
            outputs=outputs,
            layout=args.det_layout,
            strides=[int(s) for s in strides],
            score_threshold=args.score_threshold,
            nms_iou=args.nms_iou,
            max_detections=args.max_det,
            class_agnostic=args.class_agnostic,
        )
    )
    from edgefleet.server.keystore import init_key
    from edgefleet.server.optimize.detect.run import optimize_detector
    from edgefleet.server.paths import keys_dir

    key, created = init_key(args.keys_dir or keys_dir())
    if created:
        print(f"created fleet key {key.id} in {key.directory}")
    try:
        optimize_detector(args.model, args.data, args.out, spec, detection, key, opts)
    except OptimizeError as exc:
        raise CliError(str(exc)) from None
    return 0
