"""Input-tensor boxes map back onto the frame exactly as preprocessing put them there."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.bundle.manifest import Preprocessing
from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.geometry import Letterbox
from edgefleet.agent.runtime.preprocess import Preprocessor


def _spec(h: int, w: int, resize: str, interpolation: str = "linear") -> Preprocessing:
    return Preprocessing.model_validate(
        {
            "height": h,
            "width": w,
            "resize": resize,
            "interpolation": interpolation,
            "color": "GRAY",
            "layout": "NHWC",
            "scale": 1.0,
            "mean": [0.0],
            "std": [1.0],
        }
    )


def test_letterbox_640x480_to_320x320_by_hand() -> None:
    # s = .5: 320x240 image, top = (320 - 240) // 2 = 40, left = 0
    lb = Letterbox.from_spec((480, 640), _spec(320, 320, "letterbox"))
    assert (lb.scale_x, lb.scale_y, lb.offset_x, lb.offset_y) == (0.5, 0.5, 0.0, 40.0)
    got = lb.to_frame([(10, 50, 110, 90), (0, 0, 320, 30), (-5, 30, 330, 290)])
    np.testing.assert_array_equal(got, [(20, 20, 220, 100), (0, 0, 640, 0), (0, 0, 640, 480)])


def test_letterbox_uses_the_rounded_size_not_the_nominal_scale() -> None:
    # 500x333 -> 320x320: s = .64, nh = round(213.12) = 213, top = 53. The image's bottom
    # edge (input y 266) is frame y 333 exactly; s = .64 would put it at 332.8.
    lb = Letterbox.from_spec((333, 500), _spec(320, 320, "letterbox"))
    assert (lb.offset_x, lb.offset_y) == (0.0, 53.0)
    np.testing.assert_allclose(lb.to_frame([(0, 53, 320, 266)]), [(0, 0, 500, 333)], atol=1e-4)


def test_center_crop_and_stretch_by_hand() -> None:
    # 480x640 -> 320x320 crop: s = 2/3, resized 320x427, cut from left = 53
    cc = Letterbox.from_spec((480, 640), _spec(320, 320, "center_crop"))
    np.testing.assert_allclose(
        cc.to_frame([(0, 0, 320, 320)]),
        [(53 * 640 / 427, 0, 373 * 640 / 427, 480)],
        rtol=1e-6,
    )
    st = Letterbox.from_spec((480, 640), _spec(320, 320, "stretch"))
    np.testing.assert_allclose(st.to_frame([(10, 10, 20, 20)]), [(20, 15, 40, 30)])


def _tensor_bbox(img: np.ndarray) -> tuple[int, int, int, int]:
    """Edges (x1, y1, x2, y2) of the pixels brighter than half the rectangle's grey."""
    ys, xs = np.nonzero(img > 100)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize(
    ("frame_hw", "target_hw", "resize", "rect"),
    [
        ((480, 640), (320, 320), "letterbox", (101, 67, 333, 290)),
        ((375, 500), (320, 320), "letterbox", (37, 41, 411, 302)),
        ((500, 375), (320, 320), "letterbox", (41, 37, 302, 411)),
        ((60, 100), (256, 320), "letterbox", (13, 7, 71, 50)),  # upscaling, padded rows
        ((41, 97), (64, 64), "letterbox", (10, 5, 90, 36)),  # odd sizes, odd padding
        ((480, 640), (320, 320), "center_crop", (201, 67, 433, 290)),
        ((375, 500), (240, 320), "center_crop", (90, 41, 411, 302)),
        ((480, 640), (240, 320), "stretch", (101, 67, 333, 290)),
        ((300, 200), (320, 320), "stretch", (21, 33, 180, 250)),
    ],
)
def test_rectangle_through_the_real_preprocessing_maps_back(
    frame_hw: tuple[int, int],
    target_hw: tuple[int, int],
    resize: str,
    rect: tuple[int, int, int, int],
) -> None:
    spec = _spec(*target_hw, resize)
    frame = np.zeros(frame_hw, np.uint8)
    x1, y1, x2, y2 = rect
    frame[y1:y2, x1:x2] = 200
    tensor = Preprocessor(spec, dtype="uint8")(frame)[0, :, :, 0]
    lb = Letterbox.from_spec(frame_hw, spec)
    # At scales >= .5 a thresholded edge is within half an input pixel, <= 1 frame pixel.
    back = lb.to_frame([_tensor_bbox(tensor)])[0]
    np.testing.assert_allclose(back, rect, atol=1.0)
    # and the frame box lands where the tensor shows it, within half an input pixel
    np.testing.assert_allclose(lb.to_input([rect])[0], _tensor_bbox(tensor), atol=0.5 + 1e-6)


def test_boxes_in_the_padding_clip_to_the_frame_and_detections_keep_scores() -> None:
    lb = Letterbox.from_spec((480, 640), _spec(320, 320, "letterbox"))
    # the second lies wholly in the top padding (input rows 0-40): nothing of it to report
    dets = Detections.of([(-20, 0, 400, 400), (10, 5, 50, 35)], [0.7, 0.9], [3, 1])
    got = lb.detections_to_frame(dets)
    np.testing.assert_array_equal(got.boxes, [(0, 0, 640, 480)])
    assert got.scores.tolist() == pytest.approx([0.7]) and got.classes.tolist() == [3]


def test_same_size_frame_is_identity_for_every_policy() -> None:
    for resize in ("letterbox", "center_crop", "stretch"):
        lb = Letterbox.from_spec((64, 48), _spec(64, 48, resize))
        np.testing.assert_array_equal(lb.to_frame([(1, 2, 30, 40)]), [(1, 2, 30, 40)])
