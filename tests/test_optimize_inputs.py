"""`edgefleet optimize` inputs: every .npz key scheme, dtype and layout; the model/data channel
check; and one-line refusals from the real command for each bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

from edgefleet.agent.bundle import Preprocessing, verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.keystore import init_key
from edgefleet.server.optimize.data import (
    LabelledData,
    check_channels,
    load_labelled,
)
from edgefleet.server.optimize.errors import DataError, ModelError
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.optimize.preprocessing import infer_preprocessing
from edgefleet.server.optimize.runner import logits_of
from tests.optimize_models import conv_bn_model

U8 = npt.NDArray[np.uint8]
GREY = Preprocessing(height=8, width=8, color="GRAY", mean=[0.0], std=[1.0])
RGB = Preprocessing(height=8, width=8, color="RGB", mean=[0.0] * 3, std=[1.0] * 3)


def _digits() -> tuple[U8, npt.NDArray[np.int64]]:
    """scikit-learn's 8x8 digits (values 0..16) stretched to uint8 0..255."""
    d = load_digits()
    grey = np.clip(np.rint(d.images * 255 / 16), 0, 255).astype(np.uint8)
    return grey, d.target.astype(np.int64)


def _colour(grey: U8) -> U8:
    """BGR frames whose three channels differ (blue = grey, green = shifted, red = inverted)."""
    return np.stack([grey, np.roll(grey, 1, axis=-1), 255 - grey], axis=-1)


GREY_IMAGES, LABELS = _digits()
COLOUR_IMAGES = _colour(GREY_IMAGES)
# Four disjoint splits of the digits, named as a user would write them.
_PARTS = {"train": slice(0, 900), "calib": slice(900, 1100), "val": slice(1100, 1400)}
_PARTS["test"] = slice(1400, 1797)
_CANON = {"train": "train", "calib": "calibration", "val": "validation", "test": "test"}


def _save(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _check_splits(data: LabelledData, images: U8) -> None:
    """Every split holds exactly the frames and labels of its part of the source."""
    for alias, part in _PARTS.items():
        split = _CANON[alias]
        assert len(data.images[split]) == len(images[part])
        for got, want in zip(data.images[split], images[part], strict=True):
            assert got.dtype == np.uint8 and np.array_equal(got, want)
        assert [data.names[i] for i in data.labels[split]] == [str(v) for v in LABELS[part]]


@pytest.mark.parametrize(
    ("image_key", "label_key"),
    [
        ("{s}_images", "{s}_labels"),
        ("x_{s}", "y_{s}"),
        ("X_{s}", "y_{s}"),
        ("X_{s}", "Y_{s}"),
        ("{s}_x", "{s}_y"),
        ("{s}_X", "{s}_y"),
    ],
)
def test_split_key_schemes(tmp_path: Path, image_key: str, label_key: str) -> None:
    arrays: dict[str, Any] = {image_key.format(s=s): GREY_IMAGES[p] for s, p in _PARTS.items()}
    arrays |= {label_key.format(s=s): LABELS[p] for s, p in _PARTS.items()}
    data = load_labelled(_save(tmp_path / "d.npz", **arrays))
    assert data.provenance["given_splits"] == sorted(_CANON.values())
    _check_splits(data, GREY_IMAGES)


@pytest.mark.parametrize(
    ("image_key", "label_key"),
    [("images", "labels"), ("x", "y"), ("X", "y"), ("data", "target")],
)
def test_one_set_key_schemes_are_carved(tmp_path: Path, image_key: str, label_key: str) -> None:
    path = _save(tmp_path / "d.npz", **{image_key: GREY_IMAGES, label_key: LABELS})
    data = load_labelled(path)
    assert data.provenance["carved"]["from"] == "all"
    assert sum(data.sizes().values()) == len(GREY_IMAGES)
    for split, idx in data.provenance["carved"]["indices"].items():
        assert all(
            np.array_equal(f, GREY_IMAGES[i]) for f, i in zip(data.images[split], idx, strict=True)
        )


def test_more_split_aliases_and_a_carved_train(tmp_path: Path) -> None:
    path = _save(
        tmp_path / "d.npz",
        x_training=GREY_IMAGES[:1200],
        y_training=LABELS[:1200],
        x_valid=GREY_IMAGES[1200:1500],
        y_valid=LABELS[1200:1500],
        x_testing=GREY_IMAGES[1500:],
        y_testing=LABELS[1500:],
    )
    data = load_labelled(path)
    assert data.sizes()["validation"] == 300 and data.sizes()["test"] == 297
    assert data.sizes()["train"] + data.sizes()["calibration"] == 1200


def _nchw(x: U8) -> U8:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# (what is stored, which source frames it must give back)
_FORMS: dict[str, tuple[Any, U8]] = {
    "uint8 NHW": (GREY_IMAGES, GREY_IMAGES),
    "uint8 NHW1": (GREY_IMAGES[..., None], GREY_IMAGES),
    "uint8 N1HW": (GREY_IMAGES[:, None], GREY_IMAGES),
    "float32 N1HW in [0,1]": ((GREY_IMAGES[:, None] / 255).astype(np.float32), GREY_IMAGES),
    "float64 NHW in [0,255]": (GREY_IMAGES.astype(np.float64), GREY_IMAGES),
    "int64 NHW": (GREY_IMAGES.astype(np.int64), GREY_IMAGES),
    "float64 flat (N,64)": (GREY_IMAGES.reshape(-1, 64).astype(np.float64), GREY_IMAGES),
    "uint8 NHWC": (COLOUR_IMAGES, COLOUR_IMAGES),
    "uint8 NCHW": (_nchw(COLOUR_IMAGES), COLOUR_IMAGES),
    "float32 NCHW in [0,1]": ((_nchw(COLOUR_IMAGES) / 255).astype(np.float32), COLOUR_IMAGES),
    "float32 NHWC in [0,255]": (COLOUR_IMAGES.astype(np.float32), COLOUR_IMAGES),
}


@pytest.mark.parametrize("form", list(_FORMS))
def test_dtypes_and_layouts_become_camera_frames(tmp_path: Path, form: str) -> None:
    stored, want = _FORMS[form]
    arrays: dict[str, Any] = {f"{s}_images": stored[p] for s, p in _PARTS.items()}
    arrays |= {f"{s}_labels": LABELS[p] for s, p in _PARTS.items()}
    data = load_labelled(_save(tmp_path / "d.npz", **arrays))
    assert data.images["test"][0].ndim == want.ndim - 1
    _check_splits(data, want)


@pytest.mark.parametrize("declared", ["RGB", "rgb", b"RGB"])
def test_rgb_arrays_declared_by_a_color_key(tmp_path: Path, declared: Any) -> None:
    rgb = COLOUR_IMAGES[..., ::-1]
    arrays: dict[str, Any] = {f"{s}_images": _nchw(rgb[p]) for s, p in _PARTS.items()}
    arrays |= {f"{s}_labels": LABELS[p] for s, p in _PARTS.items()}
    data = load_labelled(_save(tmp_path / "d.npz", color=np.array(declared), **arrays))
    _check_splits(data, COLOUR_IMAGES)  # back in OpenCV's BGR order


def test_bgr_is_the_default_and_can_be_declared(tmp_path: Path) -> None:
    arrays = {"images": COLOUR_IMAGES, "labels": LABELS}
    plain = load_labelled(_save(tmp_path / "a.npz", **arrays))
    declared = load_labelled(_save(tmp_path / "b.npz", color="BGR", **arrays))
    for split in plain.images:
        assert all(
            np.array_equal(a, b)
            for a, b in zip(plain.images[split], declared.images[split], strict=True)
        )
    idx = plain.provenance["carved"]["indices"]["test"][0]
    assert np.array_equal(plain.images["test"][0], COLOUR_IMAGES[idx])


def test_ambiguous_layout_reads_channels_last(tmp_path: Path) -> None:
    """(N, 3, H, 3): both dims could be channels; the last one wins (documented)."""
    x = np.arange(40 * 3 * 5 * 3, dtype=np.uint8).reshape(40, 3, 5, 3)
    data = load_labelled(_save(tmp_path / "d.npz", images=x, labels=np.arange(40) % 2))
    assert data.images["train"][0].shape == (3, 5, 3)


def test_one_hot_and_float_labels(tmp_path: Path) -> None:
    one_hot = np.eye(10, dtype=np.float32)[LABELS]
    a = load_labelled(_save(tmp_path / "a.npz", x=GREY_IMAGES, y=one_hot))
    b = load_labelled(_save(tmp_path / "b.npz", x=GREY_IMAGES, y=LABELS.astype(np.float64)))
    c = load_labelled(_save(tmp_path / "c.npz", x=GREY_IMAGES, y=LABELS))
    assert a.names == b.names == c.names == [str(i) for i in range(10)]
    for split in c.labels:
        assert np.array_equal(a.labels[split], c.labels[split])
        assert np.array_equal(b.labels[split], c.labels[split])


def _refused(path: Path, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as info:
        load_labelled(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"images": GREY_IMAGES - 0.5, "labels": LABELS}, r"range over \[-0\.5, 254\.5\]"),
        ({"images": GREY_IMAGES * 2.0, "labels": LABELS}, r"range over \[0, 510\]"),
        ({"images": np.full((3, 2, 2), np.nan), "labels": [0, 1, 2]}, r"NaN or infinite"),
        ({"images": GREY_IMAGES > 9, "labels": LABELS}, r"has bool values; expected uint8"),
        ({"images": np.zeros((5, 8, 8, 5)), "labels": np.arange(5)}, r"neither the last nor"),
        ({"images": np.zeros((5, 8)), "labels": np.arange(5)}, r"expected \(N,H,W\)"),
        ({"images": GREY_IMAGES, "labels": LABELS[:-1]}, r"1797 images in 'images' but 1796"),
        ({"x_train": GREY_IMAGES}, r"has images 'x_train' but no labels 'y_train' or 'Y_train'"),
        (
            {"fold1_images": GREY_IMAGES, "fold1_labels": LABELS},
            r"'fold1_images' names unknown split 'fold1'",
        ),
        (
            {"x_val": GREY_IMAGES, "y_val": LABELS, "valid_x": GREY_IMAGES, "valid_y": LABELS},
            r"split 'validation' is given twice, by 'valid_x' and 'x_val'",
        ),
        (
            {"images": GREY_IMAGES, "labels": LABELS, "color": "HSV"},
            r"'color' must be the string 'RGB' or 'BGR'",
        ),
        ({"images": GREY_IMAGES, "labels": np.eye(10)[LABELS] * 2}, r"rows are not one-hot"),
        ({"images": GREY_IMAGES, "labels": LABELS + 0.5}, r"not whole numbers"),
    ],
    ids=lambda v: "" if isinstance(v, dict) else v[:24],
)
def test_bad_arrays_are_refused_in_one_line(
    tmp_path: Path, arrays: dict[str, Any], pattern: str
) -> None:
    _refused(_save(tmp_path / "d.npz", **arrays), pattern)


def test_unrecognised_keys_list_what_was_found_and_what_is_accepted(tmp_path: Path) -> None:
    path = _save(tmp_path / "d.npz", pixels=GREY_IMAGES, classes=LABELS)
    with pytest.raises(DataError) as info:
        load_labelled(path)
    msg = str(info.value)
    assert "['classes', 'pixels']" in msg
    for scheme in ("<split>_images/<split>_labels", "x_<split>/y_<split>", "<split>_x/<split>_y"):
        assert scheme in msg
    for pair in ("images/labels", "x/y", "X/y", "data/target"):
        assert pair in msg


def test_other_arrays_of_the_file_are_ignored(tmp_path: Path) -> None:
    path = _save(tmp_path / "d.npz", x=GREY_IMAGES, y=LABELS, mean_x=np.zeros(3), meta=1)
    assert sum(load_labelled(path).sizes().values()) == len(GREY_IMAGES)


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_text("x,y\n1,2\n")
    _refused(tmp_path / "d.npz", r"not a readable \.npz file \(not a zip archive")


# --- the model/data channel check ---------------------------------------------------------


def _data(frames: list[U8]) -> LabelledData:
    labels = np.zeros(len(frames), dtype=np.int64)
    return LabelledData(
        images={"train": frames}, labels={"train": labels}, names=["0"], provenance={}
    )


def test_grey_model_with_colour_data_is_an_error_naming_both() -> None:
    data = _data(list(COLOUR_IMAGES[:50]))
    with pytest.raises(DataError) as info:
        check_channels(data, GREY, color_given=False)
    msg = str(info.value)
    assert "input has 1 channel (GRAY)" in msg and "50 of 50 images are colour" in msg
    assert "--color GRAY" in msg
    check_channels(data, GREY, color_given=True)  # --color given: convert, as told


def test_colour_model_with_grey_data_is_an_error_naming_both() -> None:
    data = _data([*COLOUR_IMAGES[:5], *GREY_IMAGES[:7]])
    with pytest.raises(DataError, match=r"3 channels \(RGB\) but 7 of 12 images are grey"):
        check_channels(data, RGB, color_given=False)
    check_channels(data, RGB, color_given=True)


def test_matching_channels_and_grey_content_in_three_channels_pass() -> None:
    check_channels(_data(list(GREY_IMAGES[:20])), GREY, color_given=False)
    check_channels(_data(list(COLOUR_IMAGES[:20])), RGB, color_given=False)
    # Three equal channels (a grey PNG saved as RGB) are grey in content: nothing is lost.
    same = np.repeat(GREY_IMAGES[:20, :, :, None], 3, axis=-1)
    check_channels(_data(list(same)), GREY, color_given=False)
    check_channels(_data(list(same)), RGB, color_given=False)


# --- the real command ---------------------------------------------------------------------

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


def _dynamic_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.ones((10, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1),
        ],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    small = d / "small.onnx"
    onnx.save(conv_bn_model(), small)
    (d / "junk.onnx").write_bytes(b"\x00not a protobuf at all" * 10)
    (d / "text.npz").write_text("not an archive\n")
    split = {"images": COLOUR_IMAGES, "labels": LABELS}
    return {
        "small": small,
        "dynamic": _dynamic_model(d / "dynamic.onnx"),
        "junk": d / "junk.onnx",
        "good": _save(d / "good.npz", **split),
        "text": d / "text.npz",
        "keys": _save(d / "keys.npz", pixels=GREY_IMAGES, classes=LABELS),
        "range": _save(d / "range.npz", images=COLOUR_IMAGES * 2.0, labels=LABELS),
        "dir": d,
    }


_BAD = {
    "not onnx": ("{junk} --data {good}", r"junk\.onnx: not an ONNX model"),
    "missing model": ("{dir}/nope.onnx --data {good}", r"nope\.onnx: no such file"),
    "dynamic size": ("{dynamic} --data {good}", r"input size is dynamic; give --size HxW"),
    "mean count": ("{small} --data {good} --mean 0.5", r"--mean has 1 value\(s\) but the input"),
    "mean not numbers": ("{small} --data {good} --mean a,b,c", r"--mean 'a,b,c': expected comma"),
    "labels file": (
        "{small} --data {good} --labels @{dir}/no.txt",
        r"--labels @.*no\.txt: no such",
    ),
    "missing data": ("{small} --data {dir}/none.npz", r"none\.npz: no such file or folder"),
    "data not npz": ("{small} --data {text}", r"text\.npz: not a readable \.npz file"),
    "data keys": ("{small} --data {keys}", r"no image/label arrays among its keys"),
    "data range": ("{small} --data {range}", r"values range over \[0, 510\]"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_cli_refuses_in_one_line(cli_files: dict[str, Path], tmp_path: Path, case: str) -> None:
    args, pattern = _BAD[case]
    cmd = [sys.executable, "-m", "edgefleet.server.cli", "optimize"]
    cmd += args.format(**cli_files).split()
    cmd += ["--out", str(tmp_path / "out"), "--keys-dir", str(cli_files["dir"] / "k")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    # Log records (the app logs at INFO) aside, stderr is the one line of the refusal.
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("edgefleet optimize: error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"std": [1.0, 1.0]}, r"^--std has 2 value\(s\) but the input has 3 channel\(s\) \(RGB\)"),
        ({"mean": [0.5], "color": "BGR"}, r"^--mean has 1 value\(s\) .* 3 channel\(s\) \(BGR\)"),
        ({"std": [1.0, 0.0, 1.0]}, r"^--std 1,0,1: every value must be > 0$"),
        ({"size": "16xq"}, r"^--size '16xq': expected HxW or N$"),
        ({"size": "0"}, r"^--size '0': height and width must be at least 1$"),
        ({"color": "GRAY"}, r"input has 3 channel\(s\) but --color GRAY gives 1$"),
    ],
)
def test_preprocessing_refusals_name_the_option(
    cli_files: dict[str, Path], kwargs: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(ModelError, match=pattern):
        infer_preprocessing(cli_files["small"], **kwargs)


def test_a_folder_is_not_a_model(cli_files: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"is a folder, not an ONNX file$"):
        infer_preprocessing(cli_files["dir"])


# --- end to end ---------------------------------------------------------------------------


def test_float_nchw_unit_range_npz_runs_to_a_bundle(tmp_path: Path) -> None:
    """The most common way people save images: float32 (N, C, H, W) in [0, 1]."""
    model = conv_bn_model()
    onnx.save(model, tmp_path / "m.onnx")
    spec = Preprocessing(height=16, width=16, color="RGB", mean=[0.5] * 3, std=[0.25] * 3)
    frames = np.stack(
        [np.kron(f, np.ones((2, 2, 1), np.uint8)) for f in COLOUR_IMAGES[:600]]
    )  # 16x16 BGR
    # Labels are what fp32 answers on the camera frames, so fp32 scores 1.0 only if the loader
    # hands the pipeline exactly these frames (layout, scale and colour order all right).
    x = np.asarray(Preprocessor(spec).batch(list(frames)), dtype=np.float32)
    labels = logits_of(model, x).argmax(-1)
    stored = (_nchw(frames) / 255).astype(np.float32)
    data = _save(tmp_path / "d.npz", x=stored, y=labels)
    key = init_key(tmp_path / "k")[0]
    # The budget is not what this test is about: a wide one holds on any validation size.
    opts = OptimizeOptions(
        max_drop=0.5,
        quantization="none",
        exits="none",
        latency_samples=10,
        labels=[str(i) for i in range(10)],
    )
    report = optimize(tmp_path / "m.onnx", data, tmp_path / "out", spec, key, opts, lambda _: None)
    assert report["test"]["fp32_accuracy"] == 1.0
    assert report["test"]["accuracy"] == 1.0
    assert verify_bundle(tmp_path / "out" / "bundle", [key.public]).manifest.labels[0] == "0"
