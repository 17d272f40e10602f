"""Checks on one device's update: each defect refused with a reason naming the key."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.server.federated.validate import (
    DEFAULT_NORM_FACTOR,
    check_update,
    robust_norm_bound,
    update_norm,
)

Upd = dict[str, npt.NDArray[np.float32]]
EXPECTED = {
    "exit0.weight": (10, 64),
    "exit0.bias": (10,),
    "exit1.weight": (10, 32),
    "exit1.bias": (10,),
}


def update(seed: int = 3, scale: float = 0.05) -> Upd:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, scale, s).astype(np.float32) for k, s in EXPECTED.items()}


def with_value(u: Upd, key: str, index: tuple[int, ...], value: float) -> Upd:
    array = u[key].copy()
    array[index] = value
    return {**u, key: array}


def test_a_fitting_update_passes() -> None:
    u = update()
    assert check_update(u, EXPECTED, max_norm=10.0) is None
    assert check_update(u, EXPECTED, max_norm=None) is None
    # A compressed (fp16) update decoded as such is floating point too.
    assert (
        check_update({k: v.astype(np.float16) for k, v in u.items()}, EXPECTED, max_norm=10.0)
        is None
    )


def test_update_norm_is_the_global_l2_norm_without_overflow() -> None:
    u = update()
    flat = np.concatenate([v.ravel().astype(np.float64) for v in u.values()])
    assert math.isclose(update_norm(u), float(np.linalg.norm(flat)), rel_tol=1e-12)
    # 1e30 squared overflows float32; the norm of 650 such values is still finite.
    huge = {**u, "exit0.weight": np.full((10, 64), 1e30, np.float32)}
    assert math.isfinite(update_norm(huge)) and update_norm(huge) > 1e31


@pytest.mark.parametrize(
    ("make", "key", "words"),
    [
        (
            lambda u: with_value(u, "exit1.weight", (2, 5), float("nan")),
            "exit1.weight",
            "non-finite",
        ),
        (lambda u: with_value(u, "exit0.bias", (0,), float("inf")), "exit0.bias", "non-finite"),
        (lambda u: with_value(u, "exit0.bias", (9,), float("-inf")), "exit0.bias", "non-finite"),
        (
            lambda u: {**u, "exit0.weight": np.zeros((10, 63), np.float32)},
            "exit0.weight",
            "shape (10, 63), expected (10, 64)",
        ),
        (
            lambda u: {**u, "exit1.bias": np.zeros((1, 10), np.float32)},
            "exit1.bias",
            "shape (1, 10)",
        ),
        (lambda u: {k: v for k, v in u.items() if k != "exit1.bias"}, "exit1.bias", "missing"),
        (
            lambda u: {**u, "exit2.weight": np.zeros((10, 16), np.float32)},
            "exit2.weight",
            "unexpected",
        ),
        (lambda u: {**u, "exit0.bias": np.zeros(10, np.int64)}, "exit0.bias", "dtype int64"),
    ],
    ids=[
        "nan",
        "inf",
        "minus_inf",
        "wrong_shape",
        "extra_dim",
        "missing_key",
        "extra_key",
        "int_dtype",
    ],
)
def test_each_defect_is_refused_naming_the_key(
    make: Callable[[Upd], Upd], key: str, words: str
) -> None:
    reason = check_update(make(update()), EXPECTED, max_norm=None)
    assert reason is not None and key in reason and words in reason, reason


def test_huge_norm_is_refused_with_both_numbers_and_the_largest_key() -> None:
    u = {**update(), "exit1.weight": update(seed=4)["exit1.weight"] * np.float32(1000)}
    norm = update_norm(u)
    reason = check_update(u, EXPECTED, max_norm=5.0)
    assert reason == f"norm {norm:.6g} above max_norm 5 (largest part: exit1.weight)"
    assert check_update(u, EXPECTED, max_norm=norm) is None  # the bound itself is allowed
    # Structure is judged before the norm: a NaN is reported as such, not as a huge norm.
    nan = with_value(u, "exit0.bias", (1,), float("nan"))
    assert "non-finite" in (check_update(nan, EXPECTED, max_norm=5.0) or "")


def test_robust_norm_bound_drops_poisoned_updates_and_keeps_honest_ones() -> None:
    rng = np.random.default_rng(11)
    direction = {k: rng.normal(0, 0.05, s) for k, s in EXPECTED.items()}
    # Honest non-IID devices: same direction, their own scale (0.5x to 2x) and noise.
    honest = [
        {
            k: ((0.5 + 1.5 * i / 7) * direction[k] + rng.normal(0, 0.02, s)).astype(np.float32)
            for k, s in EXPECTED.items()
        }
        for i in range(8)
    ]
    scaled = {k: v * np.float32(100) for k, v in honest[0].items()}
    flipped = {k: v * np.float32(-10) for k, v in honest[1].items()}
    updates = [*honest, scaled, flipped]
    norms = [update_norm(u) for u in updates]
    bound = robust_norm_bound(norms)
    assert bound == pytest.approx(DEFAULT_NORM_FACTOR * float(np.median(norms)))
    verdicts = [check_update(u, EXPECTED, max_norm=bound) for u in updates]
    assert verdicts[:8] == [None] * 8
    assert all(v is not None and "above max_norm" in v for v in verdicts[8:])


@pytest.mark.parametrize(
    ("norms", "factor"),
    [
        ([], 5.0),
        ([1.0, float("nan")], 5.0),
        ([1.0, float("inf")], 5.0),
        ([1.0, -1.0], 5.0),
        ([1.0, 2.0], 0.5),
        ([1.0, 2.0], float("inf")),
    ],
)
def test_robust_norm_bound_rejects_bad_input(norms: list[float], factor: float) -> None:
    with pytest.raises(ValueError):
        robust_norm_bound(norms, factor)
