"""Update clipping and the Gaussian mechanism on real head updates."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.federated import (
    HeadWeights,
    add_gaussian_noise,
    clip_update,
    train_head,
    update_norm,
)

from .digits import digits_split


@pytest.fixture(scope="module")
def real_delta() -> dict[str, np.ndarray]:
    """The update one epoch of local training on digits makes to a zero head (norm ~ 5)."""
    x_tr, _, y_tr, _ = digits_split()
    base = HeadWeights(np.zeros((10, 64), np.float32), np.zeros(10, np.float32))
    result = train_head(
        base, x_tr, y_tr, epochs=1, lr=0.5, batch_size=32, weight_decay=0.0, prox_mu=0.0,
        rng=np.random.default_rng(0),
    )
    return result.head.delta(base)


def test_update_norm_is_the_global_l2_norm() -> None:
    assert update_norm({"weight": np.array([[3.0, 0.0]]), "bias": np.array([4.0])}) == 5.0
    assert update_norm({}) == 0.0


@pytest.mark.parametrize("clip", [1e-3, 0.1, 1.0, 3.0])
def test_clip_bounds_the_norm_exactly_and_keeps_the_direction(
    real_delta: dict[str, np.ndarray], clip: float
) -> None:
    norm = update_norm(real_delta)
    assert norm > 3.0
    clipped, before = clip_update(real_delta, clip)
    assert before == norm
    after = update_norm(clipped)
    assert after <= clip
    assert after == pytest.approx(clip, rel=1e-6)
    for key, value in real_delta.items():
        assert clipped[key].dtype == np.float32
        np.testing.assert_allclose(clipped[key], value * (clip / norm), rtol=1e-5, atol=1e-12)


def test_clip_leaves_small_updates_untouched(real_delta: dict[str, np.ndarray]) -> None:
    norm = update_norm(real_delta)
    clipped, before = clip_update(real_delta, norm * 1.01)
    assert before == norm
    for key, value in real_delta.items():
        np.testing.assert_array_equal(clipped[key], value)
    clipped["weight"][0, 0] += 1.0  # a copy: the caller's update is not aliased
    assert clipped["weight"][0, 0] != real_delta["weight"][0, 0]


def test_clip_refuses_non_finite_updates_and_bad_bounds() -> None:
    with pytest.raises(ValueError, match="NaN"):
        clip_update({"weight": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_update({"weight": np.array([1.0])}, 0.0)


def test_gaussian_noise_has_the_stated_std(real_delta: dict[str, np.ndarray]) -> None:
    clip, multiplier = 0.5, 1.3
    big = {"weight": np.zeros((200, 500), np.float32)}  # 100,000 coordinates
    noised = add_gaussian_noise(big, clip=clip, noise_multiplier=multiplier,
                                rng=np.random.default_rng(11))
    noise = noised["weight"].astype(np.float64)
    sigma = multiplier * clip
    # Std of the sample std is ~ sigma / sqrt(2n) = 0.22%: 2% is ~9 of those.
    assert noise.std() == pytest.approx(sigma, rel=0.02)
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)
    # Per coordinate on a real clipped update: noise adds around the update, independent
    # of its values.
    clipped, _ = clip_update(real_delta, clip)
    out = add_gaussian_noise(clipped, clip=clip, noise_multiplier=multiplier,
                             rng=np.random.default_rng(12))
    residual = np.concatenate([(out[k] - clipped[k]).ravel() for k in clipped])
    assert residual.std() == pytest.approx(sigma, rel=0.15)  # 650 coordinates


def test_noise_is_reproducible_and_zero_multiplier_adds_nothing(
    real_delta: dict[str, np.ndarray],
) -> None:
    clipped, _ = clip_update(real_delta, 1.0)
    a = add_gaussian_noise(clipped, clip=1.0, noise_multiplier=1.0, rng=np.random.default_rng(5))
    b = add_gaussian_noise(clipped, clip=1.0, noise_multiplier=1.0, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a["weight"], b["weight"])
    same = add_gaussian_noise(clipped, clip=1.0, noise_multiplier=0.0,
                              rng=np.random.default_rng(5))
    np.testing.assert_array_equal(same["weight"], clipped["weight"])


def test_noise_refuses_an_unclipped_update(real_delta: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="clip it first"):
        add_gaussian_noise(real_delta, clip=1.0, noise_multiplier=1.0,
                           rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_multiplier"):
        add_gaussian_noise({"bias": np.zeros(3)}, clip=1.0, noise_multiplier=-1.0,
                           rng=np.random.default_rng(0))
