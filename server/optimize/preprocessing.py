"""Preprocessing for a model nobody here trained: from options, else inferred from its input."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from pydantic import ValidationError

from edgefleet.agent.bundle import Preprocessing

from .errors import ModelError

log = logging.getLogger(__name__)


def _input_dims(model_path: Path) -> list[int | None]:
    if not model_path.is_file():
        what = "is a folder, not an ONNX file" if model_path.is_dir() else "no such file"
        raise ModelError(f"{model_path}: {what}")
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as exc:  # protobuf decode errors, unreadable files
        raise ModelError(f"{model_path}: not an ONNX model ({_first_line(exc)})") from None
    if not model.graph.node and not model.graph.input:
        # Protobuf parses many non-ONNX byte strings into an empty message without complaint.
        raise ModelError(f"{model_path}: not an ONNX model (no graph inside)")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{model_path}: expected one image input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _parse_size(size: str) -> tuple[int, int]:
    try:
        h, w = size.lower().split("x") if "x" in size.lower() else (size, size)
        hw = int(h), int(w)
    except ValueError:
        raise ModelError(f"--size {size!r}: expected HxW or N") from None
    if min(hw) < 1:
        raise ModelError(f"--size {size!r}: height and width must be at least 1")
    return hw


def infer_preprocessing(
    model_path: Path,
    *,
    size: str | None = None,
    color: str | None = None,
    layout: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    scale: float = 1 / 255,
    resize: str = "stretch",
    interpolation: str = "linear",
) -> Preprocessing:
    """Options win; the model's fixed input dims fill the gaps; what stays unknown is an error."""
    dims = _input_dims(model_path)
    if len(dims) != 4:
        raise ModelError(f"{model_path}: input has rank {len(dims)}, expected 4 (an image batch)")
    if layout is None:
        layout = "NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW"
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    if size is not None:
        h, w = _parse_size(size)
    if h is None or w is None:
        raise ModelError(f"{model_path}: input size is dynamic; give --size HxW")
    # Assumptions are logged only once the whole spec holds, so a refusal is one line.
    notes: list[str] = []
    if color is None:
        if c is None:
            raise ModelError(f"{model_path}: channel count is dynamic; give --color")
        color = "GRAY" if c == 1 else "RGB"
        notes.append(f"assuming colour order {color} for {c} input channel(s)")
    channels = 1 if color == "GRAY" else 3
    if c is not None and c != channels:
        raise ModelError(
            f"{model_path}: input has {c} channel(s) but --color {color} gives {channels}"
        )
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise ModelError(
                f"--{name} has {len(values)} value(s) but the input has {channels} "
                f"channel(s) ({color}); give {channels}"
            )
    if std is not None and any(v <= 0 for v in std):
        raise ModelError(f"--std {','.join(f'{v:g}' for v in std)}: every value must be > 0")
    if mean is None or std is None:
        notes.append(f"no --mean/--std given: assuming 0 and 1 after scaling by {scale:.6f}")
    try:
        spec = Preprocessing(
            height=h,
            width=w,
            resize=resize,
            interpolation=interpolation,
            color=color,
            layout=layout,
            scale=scale,
            mean=mean if mean is not None else [0.0] * channels,
            std=std if std is not None else [1.0] * channels,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"]))
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ModelError(f"preprocessing {field + ': ' if field else ''}{msg}") from None
    for note in notes:
        log.info("%s", note)
    return spec
