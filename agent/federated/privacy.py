"""Norm clipping and Gaussian noise for one device's update (update-level differential privacy).

What the pair clip_update + add_gaussian_noise gives, and what it does not:

* The unit protected is the device's whole update in one round (everything it trained on),
  not one frame: clipping bounds the L2 norm of the *update*, so the sensitivity is bounded
  per device, not per sample. Record-level DP needs each sample's gradient clipped inside
  training (DP-SGD); train_head does not do that.
* Noise is added on the device (local DP). Any two clipped updates differ by up to 2 * clip
  in L2, so one release is the Gaussian mechanism with sensitivity 2 * clip and noise
  std noise_multiplier * clip; seen centrally (add or remove one device's update from the
  coordinator's sum) the sensitivity is clip. The (epsilon, delta) for a multiplier follows
  from the Gaussian mechanism's analysis; this module does no accounting.
* It is per round: rounds compose, and the privacy loss grows with every round a device joins.
* Noise comes from numpy's Generator, not a cryptographic source, and floating-point noise is
  not hardened against precision attacks: a statistical guarantee, not an audited one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]

# Clipping scales by clip / norm shrunk by this factor, so that rounding every coordinate
# back to float32 (relative error <= 2**-24 each) cannot push the norm above clip.
_SAFETY = 1.0 - 2.0**-22


def update_norm(delta: Mapping[str, npt.ArrayLike]) -> float:
    """Global L2 norm over every array of an update, accumulated in float64."""
    total = 0.0
    for value in delta.values():
        a = np.asarray(value, dtype=np.float64)
        total += float(np.vdot(a, a))
    return math.sqrt(total)


def _checked_norm(delta: Mapping[str, npt.ArrayLike], clip: float) -> float:
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip}")
    norm = update_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or infinite values")
    return norm


def _float_copy(value: npt.ArrayLike) -> FloatArray:
    a = np.asarray(value)
    return a.astype(a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32)


def clip_update(
    delta: Mapping[str, npt.ArrayLike], clip: float
) -> tuple[dict[str, FloatArray], float]:
    """(update scaled so its global L2 norm is at most clip, norm before clipping).

    One factor for all arrays keeps the update's direction; an update already within clip
    comes back unchanged (as copies).
    """
    norm = _checked_norm(delta, clip)
    if norm <= clip:
        return {k: _float_copy(v) for k, v in delta.items()}, norm
    factor = clip / norm * _SAFETY
    out: dict[str, FloatArray] = {}
    for key, value in delta.items():
        a = _float_copy(value)
        out[key] = (a.astype(np.float64) * factor).astype(a.dtype)
    return out, norm


def add_gaussian_noise(
    delta: Mapping[str, npt.ArrayLike],
    *,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> dict[str, FloatArray]:
    """The Gaussian mechanism on a clipped update: N(0, (noise_multiplier * clip)^2) per value.

    Refuses an update whose norm exceeds clip (clip it first): the noise is calibrated to
    that bound and would protect nothing otherwise.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
    norm = _checked_norm(delta, clip)
    # Slack for float rounding only: clip_update's output always passes.
    if norm > clip * (1.0 + 1e-6):
        raise ValueError(f"update norm {norm:.6g} exceeds clip {clip:.6g}: clip it first")
    std = noise_multiplier * clip
    out: dict[str, FloatArray] = {}
    for key, value in delta.items():
        a = _float_copy(value)
        out[key] = (a + rng.normal(0.0, std, size=a.shape)).astype(a.dtype)
    return out
