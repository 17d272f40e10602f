"""The bundle manifest: what a device needs to know to run, trust and report on a model."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

FORMAT_VERSION: Literal[1] = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_SHA256 = r"^[0-9a-f]{64}$"
_FILE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")

Sha256 = Annotated[str, Field(pattern=_SHA256, description="lower-case hex sha256")]


class _Model(BaseModel):
    # A misspelt key in a manifest is an error, never a silently ignored field.
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_file_name(name: str) -> str:
    """A bundle-relative POSIX path with no '..', no absolute path, not a reserved name."""
    if not _FILE.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"file name {name!r} is not a plain relative path")
    if name in RESERVED_NAMES:
        raise ValueError(f"file name {name!r} is reserved")
    return name


class TensorSpec(_Model):
    """The model's input tensor as the first stage expects it."""

    name: str = Field(min_length=1, max_length=256, description="ONNX input name of stage 0")
    shape: list[int | str] = Field(min_length=1, max_length=8, description="dims; str = symbolic")
    dtype: Literal["float32", "float16", "uint8", "int8"] = "float32"


class Preprocessing(_Model):
    """How a camera frame (OpenCV BGR uint8) becomes the input tensor, step by step."""

    height: int = Field(ge=1, le=8192, description="resize target height in pixels")
    width: int = Field(ge=1, le=8192, description="resize target width in pixels")
    resize: Literal["stretch", "letterbox", "center_crop"] = Field(
        "stretch", description="how the frame's aspect ratio is handled"
    )
    interpolation: Literal["nearest", "linear", "area", "cubic"] = "linear"
    color: Literal["GRAY", "RGB", "BGR"] = Field(description="channel order the model expects")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = Field(1 / 255, gt=0, description="multiplied into pixel values first")
    mean: list[float] = Field(description="per channel, subtracted after scaling")
    std: list[float] = Field(description="per channel, divided after subtracting the mean")

    @property
    def channels(self) -> int:
        """Channel count implied by the colour order."""
        return 1 if self.color == "GRAY" else 3

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocessing:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean and std need {self.channels} value(s) for color {self.color}, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class ExitHead(_Model):
    """Where a stage's prediction comes from and how its confidence is judged.

    Confidence is always in [0, 1] and a frame exits when confidence >= threshold:
    max_softmax = top-1 probability; margin = top-1 minus top-2 probability;
    entropy = 1 - H(p) / log(classes).
    """

    output: str = Field(min_length=1, max_length=256, description="tensor the exit reads")
    kind: Literal["logits", "features"] = Field(
        description="logits: the output is class scores; features: head_file maps it to scores"
    )
    head_file: str | None = Field(None, description=".npz with 'weight' (C,F) and 'bias' (C,)")
    graph_file: str | None = Field(
        None,
        description="ONNX branch computing `output` from the stage's outputs; run only while "
        "the exit is enabled (onnxruntime runs every node of a session, fetched or not)",
    )
    rule: Literal["max_softmax", "entropy", "margin"] = "max_softmax"

    @model_validator(mode="after")
    def _head_file(self) -> ExitHead:
        if self.kind == "features" and self.head_file is None:
            raise ValueError("an exit of kind 'features' needs a head_file")
        if self.kind == "logits" and self.head_file is not None:
            raise ValueError("an exit of kind 'logits' takes no head_file")
        if self.head_file is not None:
            check_file_name(self.head_file)
        if self.graph_file is not None:
            check_file_name(self.graph_file)
        return self


Decoder = Literal["yolov8", "yolox"]


class Detection(_Model):
    """How a detector's raw outputs become boxes (agent/detect/decode.py), declared, never guessed.

    yolov8: one output (1, 4 + C, N) ("attributes_first", as Ultralytics exports it) or
    (1, N, 4 + C) ("boxes_first"); rows are cx, cy, w, h in input pixels, then C class scores
    in [0, 1]. yolox: one output (1, N, 5 + C), rows are raw grid offsets x, y, log w, log h,
    objectness, C class scores, over the grids of `strides` (YOLOX's export without
    decode_in_inference); a box's score is objectness x class score.
    """

    decoder: Decoder = Field(description="output layout family")
    outputs: list[str] = Field(
        min_length=1, max_length=4, description="ONNX outputs of the last stage the decoder reads"
    )
    layout: Literal["attributes_first", "boxes_first"] = Field(
        "attributes_first", description="yolov8 only: (1, 4+C, N) or (1, N, 4+C)"
    )
    strides: list[int] = Field(
        default_factory=lambda: [8, 16, 32],
        min_length=1,
        max_length=8,
        description="yolox only: the feature strides whose grids the rows follow, in order",
    )
    score_threshold: float = Field(0.25, gt=0, le=1, description="boxes below are dropped")
    class_thresholds: dict[str, float] = Field(
        default_factory=dict, description="label -> score threshold overriding score_threshold"
    )
    nms_iou: float = Field(0.45, gt=0, le=1, description="IoU above which NMS drops a box")
    max_detections: int = Field(100, ge=1, le=10_000, description="kept per frame, best first")
    class_agnostic: bool = Field(False, description="NMS across classes instead of per class")

    @field_validator("strides")
    @classmethod
    def _strides(cls, value: list[int]) -> list[int]:
        if any(s < 1 or s > 1024 for s in value):
            raise ValueError(f"strides {value} must be between 1 and 1024")
        return value

    @field_validator("class_thresholds")
    @classmethod
    def _class_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for label, t in value.items():
            if not 0.0 < t <= 1.0:
                raise ValueError(f"class_thresholds[{label!r}] = {t} outside (0, 1]")
        return value


class Gate(_Model):
    """When a detector may skip a frame and keep the last objects (agent/detect/gate.py).

    Motion is measured as in Frigate: the frame is shrunk to `width` pixels, blurred, and
    compared with a running average of past frames; a pixel moved when it differs by more
    than `pixel_threshold` grey levels. The detector runs when at least `motion` of the
    pixels moved, and at the latest every `max_skip` + 1 frames whatever the motion.
    """

    motion: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fraction of moved pixels that runs the detector; None: every frame runs it",
    )
    pixel_threshold: int = Field(25, ge=1, le=255, description="grey levels that count as motion")
    width: int = Field(64, ge=8, le=1024, description="motion is measured at this width")
    max_skip: int = Field(30, ge=0, le=100_000, description="consecutive frames skipped at most")


class Stage(_Model):
    """One ONNX sub-model: reads the previous stage's tensors, emits the next ones."""

    file: str = Field(description="bundle-relative path of the stage's ONNX file")
    inputs: list[str] = Field(min_length=1, description="tensor names read")
    outputs: list[str] = Field(default_factory=list, description="tensors passed to the next stage")
    exit: ExitHead | None = Field(None, description="the exit head after this stage, if any")
    macs: int | None = Field(None, ge=0, description="multiply-accumulates of this stage")

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        return check_file_name(value)


class OperatingPoint(_Model):
    """One set of exit thresholds, from accurate to fast, with what it was measured to give."""

    name: str = Field(min_length=1, max_length=64)
    thresholds: list[float | None] = Field(
        description="one per early exit; None disables that exit"
    )
    val_accuracy: float | None = Field(None, ge=0, le=1, description="on the validation split")
    expected_macs: float | None = Field(None, ge=0, description="mean MACs per frame")
    exit_rates: list[float] | None = Field(None, description="fraction of frames per exit")
    gate: Gate | None = Field(None, description="detectors: when a frame may skip the model")
    skip_fraction: float | None = Field(
        None, ge=0, le=1, description="detectors: fraction of frames the gate skipped on validation"
    )
    val_recall: float | None = Field(
        None, ge=0, le=1, description="detectors: recall at IoU 0.5 with the gate, on validation"
    )

    @field_validator("thresholds")
    @classmethod
    def _range(cls, value: list[float | None]) -> list[float | None]:
        for t in value:
            if t is not None and not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold {t} outside [0, 1]")
        return value


class Provenance(_Model):
    """Where the bundle came from, so any device's model can be traced and rebuilt."""

    source_model_sha256: Sha256
    source_model_name: str | None = None
    optimizer: dict[str, str | int | float | bool | list[str] | None] = Field(default_factory=dict)
    calibration: str | None = Field(None, description="calibration set description")
    tool: str = Field("edgefleet", description="what built it, with version")


class Metrics(_Model):
    """What was measured when the bundle was built (all optional)."""

    accuracy: float | None = Field(None, ge=0, le=1, description="end to end, test split")
    accuracy_per_exit: list[float | None] = Field(default_factory=list)
    exit_rates: list[float] = Field(default_factory=list)
    latency_ms: dict[str, float] = Field(default_factory=dict, description="label -> median ms")
    extra: dict[str, float] = Field(default_factory=dict)


class FileEntry(_Model):
    """Hash and size of one file in the bundle."""

    sha256: Sha256
    size: int = Field(ge=0)


class HealthSpec(_Model):
    """What a device checks before it switches to a new bundle (agent/update/health.py).

    The golden file is an .npz in the bundle with `inputs` (N, *input shape without the batch
    dim; float32 or uint8, already preprocessed), `probs` (N, classes: the final head's softmax
    with every exit disabled), `exit_index` and `class_index` (N,) at the default operating
    point, all recorded by the optimizer through the very bundle it wrote.

    A detector's golden file (manifest task "detect") has the same `inputs` and, in place of
    the probabilities, the decoded detections of every input at the bundle's own thresholds:
    `boxes` (M, 4) float32 xyxy in input-tensor pixels, `scores` (M,) float32, `classes` (M,)
    int64 and `image_index` (M,) int64 (which input each box belongs to). A device must find
    each golden box again (same class, IoU >= min_iou, score within atol) unless its score
    is within atol of its class's threshold, and no new box scoring above threshold + atol.
    """

    golden_file: str = Field(description="bundle-relative .npz with the golden inputs/outputs")
    golden_kind: Literal["validation", "synthetic"] = Field(
        "validation",
        description="validation: inputs from the validation split, outputs are meaningful; "
        "synthetic: a deterministic made-up input, good only for the NaN/determinism check",
    )
    # INT8 kernels differ across CPUs (VNNI vs. plain AVX2 vs. NEON dot products round and
    # saturate differently), so a device never reproduces the optimizer's probabilities bit
    # for bit; 0.05 absorbs that while a wrong or corrupted model is far outside it.
    atol: float = Field(0.05, ge=0, le=1, description="max |probs - golden probs| allowed")
    min_agreement: float = Field(
        1.0,
        ge=0,
        le=1,
        description="fraction of golden inputs whose top-1 class must match; inputs whose "
        "recorded top-1 margin is below atol are excused",
    )
    latency_ms: dict[str, float] = Field(
        default_factory=dict,
        description="device class -> median ms per frame, all exits disabled, measured by the "
        "optimizer on its own host",
    )
    # The device still runs the old model on the same cores while the check runs.
    latency_factor: float = Field(3.0, ge=1, description="allowed slowdown over latency_ms")
    # Only a detector's health sets it; None is left out of the manifest's bytes (below), so
    # a classifier's manifest is what it was before the field existed and older agents
    # (extra="forbid") still read it.
    min_iou: float | None = Field(
        None,
        gt=0,
        le=1,
        description="detectors: IoU at which a device's box matches a golden box of its class "
        "(None: agent/update/health.py's default, 0.8)",
    )

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        data: dict[str, object] = handler(self)
        if self.min_iou is None:
            data.pop("min_iou", None)
        return data

    @field_validator("golden_file")
    @classmethod
    def _golden(cls, value: str) -> str:
        check_file_name(value)
        if not value.endswith(".npz"):
            raise ValueError(f"golden_file {value!r} must be an .npz file")
        return value

    @field_validator("latency_ms")
    @classmethod
    def _latency(cls, value: dict[str, float]) -> dict[str, float]:
        for name, ms in value.items():
            if not 0 < ms < 1e7 or len(name) > 64:
                raise ValueError(f"latency_ms[{name!r}] = {ms} is not a latency in ms")
        return value


class ManifestBody(_Model):
    """Everything in a manifest except what the writer fills in (file hashes, signer)."""

    format_version: Literal[1] = FORMAT_VERSION
    model_id: str = Field(pattern=_ID)
    version: int = Field(ge=1, description="monotonically increasing per model_id")
    created_ts: float = Field(ge=0)
    input: TensorSpec
    preprocessing: Preprocessing
    # Optional so that bundles written before detectors existed still verify.
    task: Literal["classify", "detect"] = Field(
        "classify", description="what the model does; the agent never guesses it from shapes"
    )
    detection: Detection | None = Field(None, description="task 'detect': how to decode outputs")
    labels: list[str] = Field(min_length=1, max_length=100_000)
    stages: list[Stage] = Field(min_length=1, max_length=16)
    operating_points: list[OperatingPoint] = Field(default_factory=list)
    default_operating_point: int = Field(0, ge=0)
    provenance: Provenance
    metrics: Metrics = Field(default_factory=Metrics)
    # Optional so that bundles written before it existed still verify (format_version stays 1).
    health: HealthSpec | None = Field(None, description="the device's pre-switch health check")

    @property
    def early_exits(self) -> list[int]:
        """Indices of stages whose exit can stop a frame early (all but the last stage)."""
        return [i for i, s in enumerate(self.stages[:-1]) if s.exit is not None]

    @model_validator(mode="after")
    def _consistent(self) -> ManifestBody:
        self._task_consistent()
        if self.stages[0].inputs != [self.input.name]:
            raise ValueError(
                f"stage 0 reads {self.stages[0].inputs}, but the input is {self.input.name!r}"
            )
        for k in range(1, len(self.stages)):
            if self.stages[k].inputs != self.stages[k - 1].outputs:
                raise ValueError(
                    f"stage {k} reads {self.stages[k].inputs}, "
                    f"but stage {k - 1} outputs {self.stages[k - 1].outputs}"
                )
        if self.stages[-1].outputs:
            raise ValueError("the last stage must not pass tensors on")
        final_exit = self.stages[-1].exit
        if final_exit is not None and final_exit.graph_file is not None:
            raise ValueError("the last stage's exit is its own output; it takes no graph_file")
        n_exits = len(self.early_exits)
        for op in self.operating_points:
            if len(op.thresholds) != n_exits:
                raise ValueError(
                    f"operating point {op.name!r} has {len(op.thresholds)} thresholds "
                    f"for {n_exits} early exit(s)"
                )
        if self.operating_points and self.default_operating_point >= len(self.operating_points):
            raise ValueError(
                f"default_operating_point {self.default_operating_point} out of range "
                f"({len(self.operating_points)} operating points)"
            )
        if not self.operating_points and self.default_operating_point != 0:
            raise ValueError("default_operating_point must be 0 when there are no operating points")
        return self

    def _task_consistent(self) -> None:
        if self.task == "classify":
            if self.detection is not None:
                raise ValueError("task 'classify' takes no detection section")
            if len(self.labels) < 2:
                raise ValueError(f"a classifier needs at least 2 labels, got {len(self.labels)}")
            if self.stages[-1].exit is None:
                raise ValueError("the last stage must have an exit (the model's classifier)")
            if any(op.gate is not None for op in self.operating_points):
                raise ValueError("operating points of a classifier take no gate")
            return
        if self.detection is None:
            raise ValueError("task 'detect' needs a detection section (decoder and outputs)")
        with_exit = [k for k, s in enumerate(self.stages) if s.exit is not None]
        if with_exit:
            raise ValueError(
                f"task 'detect' takes no classifier exits, but stage(s) {with_exit} have one"
            )
        unknown = sorted(set(self.detection.class_thresholds) - set(self.labels))
        if unknown:
            raise ValueError(f"detection.class_thresholds names unknown label(s): {unknown}")

    def referenced_files(self) -> list[str]:
        """Every file the manifest points at: stage models and exit head weights."""
        names: list[str] = []
        for stage in self.stages:
            names.append(stage.file)
            if stage.exit is not None:
                names.extend(f for f in (stage.exit.graph_file, stage.exit.head_file) if f)
        if self.health is not None:
            names.append(self.health.golden_file)
        return names


class Manifest(ManifestBody):
    """A complete manifest: the body plus every file's hash and the signer's key id."""

    signer: str = Field(pattern=r"^[0-9a-f]{16}$", description="key id of the signing key")
    files: dict[str, FileEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _files_cover_references(self) -> Manifest:
        for name in self.files:
            check_file_name(name)
        missing = [n for n in self.referenced_files() if n not in self.files]
        if missing:
            raise ValueError(f"files referenced but not listed: {', '.join(missing)}")
        return self
