"""The agent's preprocessing follows the manifest exactly and names what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.bundle import Preprocessing
from edgefleet.agent.runtime.preprocess import FrameError, Preprocessor


def _spec(**kw: object) -> Preprocessing:
    base: dict[str, object] = {
        "height": 4,
        "width": 6,
        "color": "RGB",
        "mean": [0, 0, 0],
        "std": [1, 1, 1],
    }
    base.update(kw)
    return Preprocessing.model_validate(base)


def test_bgr_frame_to_rgb_nchw_with_normalisation() -> None:
    frame = np.zeros((4, 6, 3), np.uint8)
    frame[..., 0] = 255  # blue in OpenCV's BGR order
    pre = Preprocessor(_spec(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    x = pre(frame)
    assert x.shape == (1, 3, 4, 6) and x.dtype == np.float32
    # RGB order: blue is now channel 2 -> (1 - .5) / .5 = 1; others (0 - .5)/.5 = -1
    assert np.all(x[0, 2] == 1.0) and np.all(x[0, :2] == -1.0)


def test_formula_is_scale_then_mean_then_std_in_float32() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    spec = _spec(color="GRAY", mean=[0.1307], std=[0.3081])
    x = Preprocessor(spec)(frame)
    want = (frame.astype(np.float32) * np.float32(spec.scale) - np.float32(0.1307)) / np.float32(
        0.3081
    )
    assert np.array_equal(x[0, 0], want)


@pytest.mark.parametrize(
    ("color", "mean", "std", "layout"),
    [
        ("GRAY", [0.1307], [0.3081], "NCHW"),
        ("GRAY", [0.5], [0.25], "NHWC"),
        ("RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "NCHW"),
        ("BGR", [0.3, 0.2, 0.1], [0.7, 0.9, 1.3], "NHWC"),
    ],
)
def test_table_lookup_equals_the_formula_for_every_pixel_value(
    color: str, mean: list[float], std: list[float], layout: str
) -> None:
    # Every uint8 value in every channel: a 16x16 frame holds 0..255 once per channel.
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    channels = len(mean)
    frame = values if channels == 1 else np.stack([values] * channels, axis=-1)
    spec = _spec(height=16, width=16, color=color, mean=mean, std=std, layout=layout)
    x = Preprocessor(spec)(frame)
    rgb = frame if channels == 1 or color == "BGR" else frame[..., ::-1]
    hwc = rgb.reshape(16, 16, channels).astype(np.float32)
    hwc *= np.float32(spec.scale)
    hwc -= np.asarray(mean, np.float32)
    hwc /= np.asarray(std, np.float32)
    want = hwc.transpose(2, 0, 1) if layout == "NCHW" else hwc
    assert x.dtype == np.float32 and x.flags.c_contiguous
    assert np.array_equal(x[0], want)


def test_nhwc_and_gray_input_expanded_to_colour() -> None:
    frame = np.full((8, 12), 100, np.uint8)
    x = Preprocessor(_spec(layout="NHWC", color="BGR"))(frame)
    assert x.shape == (1, 4, 6, 3)
    assert np.allclose(x, 100 / 255)


def test_letterbox_pads_and_center_crop_cuts() -> None:
    frame = np.full((10, 30), 200, np.uint8)  # wide frame into a 4x6 target
    lb = Preprocessor(
        _spec(color="GRAY", mean=[0], std=[1], resize="letterbox", height=6, width=6), dtype="uint8"
    )(frame)
    assert lb.shape == (1, 1, 6, 6)
    assert lb[0, 0, 0].tolist() == [0] * 6 and lb[0, 0, 3].tolist() == [200] * 6  # rows padded
    cc = Preprocessor(
        _spec(color="GRAY", mean=[0], std=[1], resize="center_crop", height=6, width=6),
        dtype="uint8",
    )(frame)
    assert cc.shape == (1, 1, 6, 6) and np.all(cc == 200)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_uint8_input_is_not_normalised(layout: str) -> None:
    frame = np.zeros((4, 6, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 7, 8, 9  # B, G, R
    x = Preprocessor(_spec(layout=layout), dtype="uint8")(frame)
    rgb = [x[0, c] for c in range(3)] if layout == "NCHW" else [x[0, ..., c] for c in range(3)]
    assert x.dtype == np.uint8 and [np.unique(p).tolist() for p in rgb] == [[9], [8], [7]]


@pytest.mark.parametrize(
    ("color", "layout", "dtype"),
    [
        ("GRAY", "NCHW", "float32"),
        ("GRAY", "NHWC", "float32"),
        ("RGB", "NCHW", "float32"),
        ("BGR", "NHWC", "float32"),
        ("RGB", "NCHW", "uint8"),
        ("GRAY", "NHWC", "uint8"),
    ],
)
def test_into_writes_the_same_tensor_into_the_callers_buffer(
    color: str, layout: str, dtype: str
) -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    channels = 1 if color == "GRAY" else 3
    spec = _spec(color=color, layout=layout, mean=[0.2] * channels, std=[0.6] * channels)
    pre = Preprocessor(spec, dtype=dtype)
    buffer = np.full(pre.shape, 123, dtype=pre(frame).dtype)
    address = buffer.ctypes.data
    pre.into(frame, buffer)
    assert buffer.ctypes.data == address and np.array_equal(buffer, pre(frame))
    flipped = np.ascontiguousarray(frame[::-1])
    assert np.array_equal(pre.batch([frame, flipped])[1:], pre(flipped))


@pytest.mark.parametrize(
    ("color", "layout", "resize", "planned"),
    [
        ("GRAY", "NCHW", "stretch", True),
        ("GRAY", "NHWC", "stretch", True),
        ("BGR", "NHWC", "stretch", True),
        ("RGB", "NHWC", "stretch", True),
        ("RGB", "NCHW", "stretch", False),  # planar colour: general path
        ("GRAY", "NCHW", "letterbox", False),
    ],
)
def test_frames_into_one_buffer_take_the_planned_path_with_the_same_result(
    color: str, layout: str, resize: str, planned: bool
) -> None:
    """A camera's frames into the bound input: planned after the first, bit-identical."""
    rng = np.random.default_rng(2)
    channels = 1 if color == "GRAY" else 3
    spec = _spec(
        color=color,
        layout=layout,
        resize=resize,
        height=5,
        width=7,
        mean=[0.3] * channels,
        std=[0.2] * channels,
    )
    pre = Preprocessor(spec)
    buffer = np.zeros(pre.shape, np.float32)
    shapes = [(9, 13, 3)] * 4 + [(9, 13)] * 3 + [(5, 7, 3)] * 2 + [(12, 8, 3)] * 2
    for shape in shapes:
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        pre.into(frame, buffer)
        assert np.array_equal(buffer, pre(frame)), shape
    assert (pre._fast is not None) == planned  # the path under test was really taken


def test_a_bad_frame_after_planned_ones_is_still_named() -> None:
    pre = Preprocessor(_spec(color="GRAY", mean=[0.1], std=[0.3]))
    buffer = np.zeros(pre.shape, np.float32)
    for _ in range(3):
        pre.into(np.zeros((8, 8, 3), np.uint8), buffer)
    with pytest.raises(FrameError, match="got float32"):
        pre.into(np.zeros((8, 8, 3), np.float32), buffer)
    with pytest.raises(FrameError, match="frame has 2 channels"):
        pre.into(np.zeros((8, 8, 2), np.uint8), buffer)


def test_into_a_float16_buffer_converts() -> None:
    frame = np.full((4, 6, 3), 51, np.uint8)
    pre = Preprocessor(_spec(mean=[0.1, 0.1, 0.1], std=[1, 1, 1]))
    buffer = np.zeros(pre.shape, np.float16)
    pre.into(frame, buffer)
    assert np.allclose(buffer, 0.1, atol=1e-3)


def test_into_a_buffer_of_another_shape_is_refused() -> None:
    pre = Preprocessor(_spec())
    with pytest.raises(ValueError, match=r"input tensor \(1, 3, 8, 8\): preprocessing makes "):
        pre.into(np.zeros((4, 6, 3), np.uint8), np.zeros((1, 3, 8, 8), np.float32))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((4, 6, 3), np.float32), "frame must be a uint8 HxW or HxWxC array, got float32"),
        (np.zeros((4,), np.uint8), "frame must be a uint8 HxW or HxWxC array"),
        (np.zeros((0, 6, 3), np.uint8), "frame is empty"),
        (np.zeros((4, 6, 2), np.uint8), "frame has 2 channels; expected 1, 3 or 4"),
    ],
)
def test_bad_frames_are_named(frame: np.ndarray, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        Preprocessor(_spec())(frame)


def test_mean_std_must_match_channels() -> None:
    with pytest.raises(
        ValueError, match=r"mean and std need 3 value\(s\) for color RGB, got 1 and 1"
    ):
        _spec(mean=[0.5], std=[0.5])


def test_agent_preprocessing_is_bit_identical_to_the_training_pipeline() -> None:
    """What a device computes from a frame is exactly what the model was trained on."""
    from edgefleet.server.datasets.preprocess import to_model_input
    from edgefleet.server.reference import load_reference_split, reference_preprocessing

    images, _ = load_reference_split()["test"]
    ours = Preprocessor(reference_preprocessing()).batch(list(images[:200]))
    assert np.array_equal(ours, to_model_input(images[:200]))
