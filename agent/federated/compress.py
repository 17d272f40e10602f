"""Compressing an update for the wire: fp32, fp16, or 8-bit affine with stochastic rounding."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

Scheme = Literal["fp32", "fp16", "q8"]
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)
F32 = npt.NDArray[np.float32]

# Little-endian on the wire whatever the device's byte order.
_DTYPES: dict[str, np.dtype[np.generic]] = {
    "fp32": np.dtype("<f4"),
    "fp16": np.dtype("<f2"),
    "q8": np.dtype("u1"),
}
_LEVELS = 255  # q8 codes 0..255
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EncodedArray:
    """One array as it travels: decoded value = offset + scale * code (q8), else the floats.

    scale and offset are 0 for fp32 and fp16.
    """

    scheme: Scheme
    shape: tuple[int, ...]
    data: bytes
    scale: float
    offset: float

    @property
    def nbytes(self) -> int:
        """Bytes this array costs: the payload, plus q8's scale and offset as two float32."""
        return len(self.data) + (8 if self.scheme == "q8" else 0)


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown compression scheme {scheme!r} (use one of {SCHEMES})")


def encode(array: npt.ArrayLike, scheme: Scheme, rng: np.random.Generator) -> EncodedArray:
    """Encode a float array; rng drives q8's stochastic rounding (unused otherwise).

    q8 maps [min, max] onto 256 levels and rounds up with probability equal to the fraction
    left over, so E[decode(encode(x))] = x and each value is off by less than one step
    (max - min) / 255; a constant array is exact (scale 0).
    """
    _check_scheme(scheme)
    a = np.asarray(array, dtype=np.float64)
    shape = tuple(int(n) for n in a.shape)
    if not np.isfinite(a).all():
        raise ValueError("cannot encode NaN or infinite values")
    if scheme == "fp32":
        return EncodedArray(scheme, shape, a.astype(_DTYPES["fp32"]).tobytes(), 0.0, 0.0)
    if scheme == "fp16":
        if a.size and float(np.abs(a).max()) > _FP16_MAX:
            raise ValueError(f"values beyond fp16's range (|x| <= {_FP16_MAX:g})")
        return EncodedArray(scheme, shape, a.astype(_DTYPES["fp16"]).tobytes(), 0.0, 0.0)
    lo = float(a.min()) if a.size else 0.0
    hi = float(a.max()) if a.size else 0.0
    scale = (hi - lo) / _LEVELS
    if scale == 0.0:
        codes = np.zeros(a.shape, dtype=np.uint8)
    else:
        t = (a - lo) / scale
        floor = np.floor(t)
        up = rng.random(a.shape) < (t - floor)
        codes = np.clip(floor + up, 0, _LEVELS).astype(np.uint8)
    return EncodedArray(scheme, shape, codes.tobytes(), scale, lo)


def decode(enc: EncodedArray) -> F32:
    """The float32 array an EncodedArray stands for; refuses data that does not fit its shape."""
    _check_scheme(enc.scheme)
    dtype = _DTYPES[enc.scheme]
    count = math.prod(enc.shape)
    if len(enc.data) != count * dtype.itemsize:
        raise ValueError(
            f"{enc.scheme} data of {len(enc.data)} bytes does not fit shape {enc.shape}"
        )
    raw = np.frombuffer(enc.data, dtype=dtype).reshape(enc.shape)
    if enc.scheme != "q8":
        return raw.astype(np.float32)
    if not (math.isfinite(enc.scale) and math.isfinite(enc.offset) and enc.scale >= 0):
        raise ValueError(f"bad q8 scale {enc.scale} / offset {enc.offset}")
    out: F32 = (enc.offset + enc.scale * raw.astype(np.float64)).astype(np.float32)
    return out


def encode_update(
    delta: Mapping[str, npt.ArrayLike], scheme: Scheme, rng: np.random.Generator
) -> dict[str, EncodedArray]:
    """Encode every array of an update with one scheme."""
    return {name: encode(value, scheme, rng) for name, value in delta.items()}


def decode_update(encoded: Mapping[str, EncodedArray]) -> dict[str, F32]:
    """Decode every array of an encoded update."""
    return {name: decode(enc) for name, enc in encoded.items()}


def update_bytes(encoded: Mapping[str, EncodedArray]) -> int:
    """Bytes of an encoded update (sum of EncodedArray.nbytes), for reporting."""
    return sum(enc.nbytes for enc in encoded.values())


def raw_bytes(delta: Mapping[str, npt.ArrayLike]) -> int:
    """Bytes the same update costs uncompressed (float32), for reporting."""
    return sum(4 * int(np.asarray(value).size) for value in delta.values())
