"""Turn an OpenCV frame into the model's input tensor exactly as the manifest says.

The optimizer and the training code call this same function, so what a device feeds the
model is bit-for-bit what the model was calibrated and evaluated on.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import Preprocessing

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


class Preprocessor:
    """Precomputed preprocessing for one manifest; call with one frame, get a batch of one."""

    def __init__(self, spec: Preprocessing, dtype: str = "float32") -> None:
        self.spec = spec
        self.dtype = dtype
        self._lut = normalization_table(spec)
        self._channels = np.arange(self._lut.shape[1])

    def __call__(self, frame: Frame) -> npt.NDArray[np.generic]:
        """One HxW or HxWxC uint8 frame -> (1, C, H, W) or (1, H, W, C) model input."""
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim not in (2, 3):
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame)
            raise FrameError(f"frame must be a uint8 HxW or HxWxC array, got {got}")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise FrameError(f"frame is empty: shape {frame.shape}")
        img = _fit(_convert_color(frame, self.spec.color), self.spec)
        if img.ndim == 2:
            img = img[:, :, None]
        if self.dtype == "uint8":
            out: npt.NDArray[np.generic] = img
        elif img.shape[2] == 1:
            # One table lookup per pixel instead of a float conversion and three arithmetic
            # passes; for one channel (1, H, W) is already NCHW.
            gray = np.take(self._lut[:, 0], img[:, :, 0])
            out = gray[None, ...] if self.spec.layout == "NCHW" else gray[..., None]
            return out[None, ...]
        else:
            out = self._lut[img, self._channels]
        if self.spec.layout == "NCHW":
            out = np.ascontiguousarray(out.transpose(2, 0, 1))
        return out[None, ...]

    def batch(self, frames: list[Frame]) -> npt.NDArray[np.generic]:
        """Several frames stacked along the batch axis (for evaluation and calibration)."""
        return np.concatenate([self(f) for f in frames], axis=0)
