"""Turn an OpenCV frame into the model's input tensor exactly as the manifest says.

The optimizer and the training code call this same function, so what a device feeds the
model is bit-for-bit what the model was calibrated and evaluated on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle.manifest import Preprocessing

log = logging.getLogger(__name__)

# OpenCV's stubs type images loosely; a frame is any HxW or HxWxC uint8 array.
Frame = npt.NDArray[Any]

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
}


class FrameError(ValueError):
    """A frame that cannot be preprocessed (wrong dtype, shape or channel count)."""


def _convert_color(frame: Frame, color: str) -> Frame:
    """OpenCV frames are BGR (or single-channel gray); convert to what the model expects."""
    if frame.ndim == 2:
        if color == "GRAY":
            return frame
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if color == "RGB" else cv2.COLOR_GRAY2BGR)
    channels = frame.shape[2]
    if channels == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    elif channels == 1:
        return _convert_color(frame[:, :, 0], color)
    elif channels != 3:
        raise FrameError(f"frame has {channels} channels; expected 1, 3 or 4")
    if color == "GRAY":
        return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    if color == "RGB":
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return frame


def _fit(frame: Frame, spec: Preprocessing) -> Frame:
    """Resize to (height, width) with the manifest's aspect-ratio policy."""
    h, w = frame.shape[:2]
    th, tw = spec.height, spec.width
    interp = _INTERPOLATION[spec.interpolation]
    if spec.resize == "stretch" or (h, w) == (th, tw):
        return frame if (h, w) == (th, tw) else cv2.resize(frame, (tw, th), interpolation=interp)
    if spec.resize == "letterbox":
        s = min(th / h, tw / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        resized = cv2.resize(frame, (nw, nh), interpolation=interp)
        out = np.zeros((th, tw, *frame.shape[2:]), dtype=frame.dtype)
        top, left = (th - nh) // 2, (tw - nw) // 2
        out[top : top + nh, left : left + nw] = resized
        return out
    s = max(th / h, tw / w)  # center_crop: cover the target, then cut the middle
    nh, nw = max(th, round(h * s)), max(tw, round(w * s))
    resized = cv2.resize(frame, (nw, nh), interpolation=interp)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return resized[top : top + th, left : left + tw]


def normalization_table(spec: Preprocessing) -> npt.NDArray[np.float32]:
    """(256, C) float32: what (x * scale - mean) / std gives for every uint8 value x.

    Computed with the documented formula in float32, one operation at a time, exactly as a
    whole frame would be; a pixel's result depends only on its value and channel, so looking
    it up gives the same bits as computing it (tested for every value).
    """
    x = np.repeat(np.arange(256, dtype=np.float32)[:, None], len(spec.mean), axis=1)
    x *= np.float32(spec.scale)
    x -= np.asarray(spec.mean, dtype=np.float32)[None, :]
    x /= np.asarray(spec.std, dtype=np.float32)[None, :]
    return x


def _check_frame(frame: Frame) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim not in (2, 3):
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame)
        raise FrameError(f"frame must be a uint8 HxW or HxWxC array, got {got}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise FrameError(f"frame is empty: shape {frame.shape}")


def _image_view(out: npt.NDArray[np.generic], spec: Preprocessing) -> Frame:
    """out seen as the HxW (gray) or HxWxC image whose memory it is.

    True for gray in any layout and for NHWC colour: there the looked-up image can be
    written straight into the tensor.
    """
    channels = (spec.channels,) if spec.channels > 1 else ()
    return out.reshape(spec.height, spec.width, *channels)


# Colour conversions that are one OpenCV call: (frame channels, model colour) -> code.
_ONE_STEP_COLOR: dict[tuple[int, str], int | None] = {
    (1, "GRAY"): None,
    (1, "RGB"): cv2.COLOR_GRAY2RGB,
    (1, "BGR"): cv2.COLOR_GRAY2BGR,
    (3, "GRAY"): cv2.COLOR_BGR2GRAY,
    (3, "RGB"): cv2.COLOR_BGR2RGB,
    (3, "BGR"): None,
}


class _FastPath:
    """The per-frame steps for one frame shape and one output tensor, planned once.

    Colour conversion, stretch resize and table lookup, each writing into an image
    allocated here (the last one into the tensor itself): no checks, branches or
    allocations per frame. Built only after the general path has handled a frame of this
    shape, and only kept when it reproduces that frame's tensor bit for bit.
    """

    def __init__(
        self,
        frame_shape: tuple[int, ...],
        out: npt.NDArray[np.generic],
        code: int | None,
        spec: Preprocessing,
        lut: npt.NDArray[np.float32],
    ) -> None:
        self.frame_shape = frame_shape
        self.out = out
        h, w = frame_shape[:2]
        size = (spec.width, spec.height)
        interp = _INTERPOLATION[spec.interpolation]
        channels = (spec.channels,) if spec.channels > 1 else ()
        view = _image_view(out, spec)
        steps: list[Callable[[Frame], Frame]] = []
        if code is not None:
            conv = np.empty((h, w, *channels), np.uint8)
            steps.append(functools.partial(cv2.cvtColor, code=code, dst=conv))
        if (h, w) != (spec.height, spec.width):
            small = np.empty((spec.height, spec.width, *channels), np.uint8)
            steps.append(functools.partial(cv2.resize, dsize=size, dst=small, interpolation=interp))
        steps.append(functools.partial(cv2.LUT, lut=lut, dst=view))
        self._steps = steps

    def fits(self, frame: Frame, out: npt.NDArray[np.generic]) -> bool:
        """True for the tensor it was planned for and a uint8 frame of its shape."""
        return (
            out is self.out
            and type(frame) is np.ndarray
            and frame.shape == self.frame_shape
            and frame.dtype == _U8
        )

    def __call__(self, frame: Frame) -> None:
        for step in self._steps:
            frame = step(frame)


_U8 = np.dtype(np.uint8)


class Preprocessor:
    """Precomputed preprocessing for one manifest; call with one frame, get a batch of one.

    `into` writes the same values straight into a caller's tensor (the first stage's bound
    input buffer), which saves an allocation and a copy per frame on the hot path.
    """

    def __init__(self, spec: Preprocessing, dtype: str = "float32") -> None:
        self.spec = spec
        self.dtype = dtype
        c, h, w = spec.channels, spec.height, spec.width
        self.shape = (1, c, h, w) if spec.layout == "NCHW" else (1, h, w, c)
        self._np_dtype = np.dtype(np.uint8 if dtype == "uint8" else np.float32)
        lut = normalization_table(spec)
        # cv2.LUT maps a uint8 image through a 256-entry table into the table's depth: one
        # channel takes a (256, 1) table, C channels a (1, 256, C) one (a table per channel).
        self._lut = np.ascontiguousarray(lut if c == 1 else lut[None, :, :])
        # The one layout where the looked-up HxWxC image is not already the tensor's memory.
        self._planar = c > 1 and spec.layout == "NCHW"
        self._fast: _FastPath | None = None
        self._last_out: npt.NDArray[np.generic] | None = None

    def __call__(self, frame: Frame) -> npt.NDArray[np.generic]:
        """One HxW or HxWxC uint8 frame -> (1, C, H, W) or (1, H, W, C) model input."""
        out = np.empty(self.shape, self._np_dtype)
        self._into(frame, out)
        return out

    def into(self, frame: Frame, out: npt.NDArray[np.generic]) -> None:
        """Write the model input for one frame into `out` (shape `self.shape`, contiguous).

        A camera delivers frames of one shape into the same tensor frame after frame: after
        the first, such frames take a planned path (`_FastPath`) with the same result. The
        plan is for one tensor: give each model its own Preprocessor (as the agent does).
        """
        fast = self._fast
        if fast is not None and fast.fits(frame, out):
            fast(frame)
            return
        self._into(frame, out)
        # Plan on the second frame into the same tensor: a one-off caller plans nothing.
        if out is self._last_out:
            self._fast = self._plan(frame, out)
        self._last_out = out

    def _plan(self, frame: Frame, out: npt.NDArray[np.generic]) -> _FastPath | None:
        """A fast path for frames like this one into `out`, if it gives the same tensor.

        Covered: float32 tensors that are the looked-up image's own memory, a colour change
        of at most one OpenCV call, a stretch resize (or none). Anything else (raw uint8,
        float16, planar colour, BGRA frames, letterbox, crop) keeps the general path.
        """
        channels = 1 if frame.ndim == 2 else frame.shape[2]
        if (channels, self.spec.color) not in _ONE_STEP_COLOR:
            return None
        if self.dtype == "uint8" or out.dtype != np.float32 or self._planar:
            return None
        if self.spec.resize != "stretch" and frame.shape[:2] != (self.spec.height, self.spec.width):
            return None
        code = _ONE_STEP_COLOR[(channels, self.spec.color)]
        expected = out.copy()  # what the general path just wrote
        fast = _FastPath(frame.shape, out, code, self.spec, self._lut)
        fast(frame)
        if not np.array_equal(out, expected):  # never seen; would mean OpenCV ignored a dst
            np.copyto(out, expected)
            log.warning("preprocessing: planned path differs for frames %s; not used", frame.shape)
            return None
        return fast

    def _into(self, frame: Frame, out: npt.NDArray[np.generic]) -> None:
        _check_frame(frame)
        if out.shape != self.shape or not out.flags.c_contiguous:
            raise ValueError(f"input tensor {out.shape}: preprocessing makes {self.shape}")
        img = _fit(_convert_color(frame, self.spec.color), self.spec)
        if self.dtype == "uint8":  # the model takes raw pixels
            np.copyto(out, self._as_tensor(img), casting="same_kind")
            return
        if out.dtype != np.float32 or self._planar:
            # float16 models, planar colour: look up in float32, then convert/reorder.
            hwc = cv2.LUT(img, self._lut)
            np.copyto(out, self._as_tensor(hwc), casting="same_kind")
            return
        # cv2.LUT writes into dst in place when it has the result's shape and type.
        view = _image_view(out, self.spec)
        result = cv2.LUT(img, self._lut, dst=view)
        if result is not view:  # OpenCV allocated instead (it never should here): copy over
            np.copyto(view, result)

    @property
    def _hwc(self) -> tuple[int, int, int]:
        return self.spec.height, self.spec.width, self.spec.channels

    def _as_tensor(self, hwc: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        arr = hwc.reshape(self._hwc)
        return (arr.transpose(2, 0, 1) if self.spec.layout == "NCHW" else arr)[None, ...]

    def batch(self, frames: list[Frame]) -> npt.NDArray[np.generic]:
        """Several frames stacked along the batch axis (for evaluation and calibration)."""
        out = np.empty((len(frames), *self.shape[1:]), self._np_dtype)
        for i, f in enumerate(frames):
            self._into(f, out[i : i + 1])
        return out
