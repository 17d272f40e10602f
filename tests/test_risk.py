"""Exact binomial bounds, paired drop bounds and fixed-sequence testing (optimize/risk.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.server.optimize.risk import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    drop_bound,
    fixed_sequence,
    min_samples,
)


def test_clopper_pearson_closed_forms() -> None:
    # With no success the upper bound solves (1 - p)^n = alpha; with all successes the lower
    # bound solves p^n = alpha.
    for n in (10, 360, 1000):
        assert clopper_pearson_upper(0, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n))
        assert clopper_pearson_lower(n, n, 0.05) == pytest.approx(0.05 ** (1 / n))
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0
    assert clopper_pearson_lower(0, 5, 0.05) == 0.0
    # A published value: 3 of 100 at 95% one-sided -> upper 0.0757.
    assert clopper_pearson_upper(3, 100, 0.05) == pytest.approx(0.0757, abs=5e-4)


@pytest.mark.parametrize("bad", [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (1, 10, 0.0)])
def test_clopper_pearson_refuses_nonsense(bad: tuple[int, int, float]) -> None:
    with pytest.raises(ValueError):
        clopper_pearson_upper(*bad)


def test_drop_bound_counts_pairs() -> None:
    ref = np.array([True, True, False, False, True])
    ours = np.array([True, False, True, False, True])
    b = drop_bound(ref, ours, 0.9)
    assert (b.n, b.lost, b.gained) == (5, 1, 1)
    assert b.drop == 0.0
    assert b.upper > b.drop
    assert b.to_report()["drop_upper"] == b.upper


def test_drop_bound_covers_the_true_drop() -> None:
    # Draw many validation sets from a known population: the bound must hold in at least
    # `confidence` of them (Clopper-Pearson is conservative, so usually more).
    rng = np.random.default_rng(0)
    p_lost, p_gained, n, confidence = 0.012, 0.004, 400, 0.9
    true_drop = p_lost - p_gained
    held = 0
    trials = 2000
    for _ in range(trials):
        u = rng.uniform(size=n)
        ref = np.ones(n, dtype=bool)
        ours = np.ones(n, dtype=bool)
        ours[u < p_lost] = False
        gained = (u >= p_lost) & (u < p_lost + p_gained)
        ref[gained] = False
        held += drop_bound(ref, ours, confidence).upper >= true_drop
    assert held / trials >= confidence


def test_fixed_sequence_stops_at_the_first_failure() -> None:
    n = 1000
    ref = np.ones(n, dtype=bool)

    def losing(k: int) -> np.ndarray:
        ours = ref.copy()
        ours[:k] = False
        return ours

    # Bounds at 90%: 0 lost -> 0.30%, 2 -> 0.63%, 20 -> 2.9%, then a good one again.
    result = fixed_sequence(ref, [losing(0), losing(2), losing(20), losing(0)], 0.01, 0.9)
    assert result.certified == 2
    assert len(result.bounds) == 3  # the walk never looks past the first failure
    assert not result.bounds[-1].within(0.01)


def test_min_samples_is_the_zero_error_limit() -> None:
    n = min_samples(0.01, 0.9)
    assert drop_bound(np.ones(n, bool), np.ones(n, bool), 0.9).within(0.01)
    assert not drop_bound(np.ones(n - 1, bool), np.ones(n - 1, bool), 0.9).within(0.01)
