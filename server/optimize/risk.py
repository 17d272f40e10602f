"""Accuracy budgets that hold on unseen data: exact binomial bounds and fixed-sequence testing.

A drop measured on a few hundred validation images is itself a random number: the point that
looks 0.9 points worse than fp32 there may be 1.5 points worse on the next thousand frames.
Every budget decision therefore compares an *upper confidence bound* of the drop with the
budget, not the measured drop.

The drop is paired: on the same N images, `lost` are right in fp32 and wrong in ours, `gained`
the reverse, and drop = (lost - gained) / N. With Clopper-Pearson (exact binomial) bounds on the
two rates, each at (1 - confidence) / 2, the union bound gives

    drop <= upper(lost) - lower(gained)      with probability >= confidence.

Choosing among many operating points on the same data would void that guarantee (the winner of
many draws is lucky), so candidates are tested in a fixed order decided on other data, from
cautious to eager, and the walk stops at the first one whose bound exceeds the budget: this is
fixed-sequence testing as used by Learn-then-Test (Angelopoulos et al., 2021), and every point
certified this way holds its budget simultaneously at the stated confidence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import beta

Bools = npt.NDArray[np.bool_]


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided exact upper bound of a binomial rate: P(rate <= bound) >= 1 - alpha."""
    _check(k, n, alpha)
    if k >= n:
        return 1.0
    return float(beta.ppf(1.0 - alpha, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided exact lower bound of a binomial rate: P(rate >= bound) >= 1 - alpha."""
    _check(k, n, alpha)
    if k <= 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def _check(k: int, n: int, alpha: float) -> None:
    if n <= 0:
        raise ValueError(f"a bound needs at least one sample, got n={n}")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, n={n}]")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


@dataclass(frozen=True)
class DropBound:
    """A paired accuracy drop and its upper confidence bound (fractions, not points)."""

    n: int
    lost: int  # right in the reference, wrong in ours
    gained: int  # wrong in the reference, right in ours
    confidence: float

    @property
    def drop(self) -> float:
        """Measured drop: (lost - gained) / n."""
        return (self.lost - self.gained) / self.n

    @property
    def upper(self) -> float:
        """Upper bound of the drop at the stated confidence (union of two one-sided bounds)."""
        alpha = (1.0 - self.confidence) / 2.0
        return clopper_pearson_upper(self.lost, self.n, alpha) - clopper_pearson_lower(
            self.gained, self.n, alpha
        )

    def within(self, budget: float) -> bool:
        """True when the bound certifies drop <= budget."""
        return self.upper <= budget + 1e-12

    def to_report(self) -> dict[str, float | int]:
        """The report's form: counts, the measured drop and its bound."""
        return {
            "n": self.n,
            "lost": self.lost,
            "gained": self.gained,
            "drop": self.drop,
            "drop_upper": self.upper,
            "confidence": self.confidence,
        }


def drop_bound(reference_correct: Bools, ours_correct: Bools, confidence: float) -> DropBound:
    """The paired drop of `ours` against the reference on the same samples, with its bound."""
    ref = np.asarray(reference_correct, dtype=np.bool_)
    ours = np.asarray(ours_correct, dtype=np.bool_)
    if ref.shape != ours.shape or ref.ndim != 1:
        raise ValueError(f"paired results must be two (N,) arrays, got {ref.shape}, {ours.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return DropBound(
        n=int(ref.shape[0]),
        lost=int((ref & ~ours).sum()),
        gained=int((~ref & ours).sum()),
        confidence=confidence,
    )


def min_samples(budget: float, confidence: float) -> int:
    """Fewest paired samples that can certify `budget` at all (no sample lost, none gained)."""
    if budget <= 0:
        return 2**62  # a zero budget is never certifiable: any sample might be lost
    alpha = (1.0 - confidence) / 2.0
    if budget >= 1:
        return 1
    # upper(0, n) = 1 - alpha ** (1 / n) <= budget  <=>  n >= log(alpha) / log(1 - budget)
    return max(1, math.ceil(math.log(alpha) / math.log1p(-budget) - 1e-9))


@dataclass(frozen=True)
class SequenceResult:
    """Fixed-sequence testing: the bounds walked, and how many candidates were certified."""

    bounds: list[DropBound]
    certified: int  # candidates 0 .. certified-1 hold the budget; the walk stopped after them


def fixed_sequence(
    reference_correct: Bools,
    candidates_correct: Iterable[Bools],
    budget: float,
    confidence: float,
) -> SequenceResult:
    """Test candidates in the given order (cautious first); stop at the first bound > budget.

    The order must not depend on the samples tested here, or the guarantee is void.
    """
    bounds: list[DropBound] = []
    for ours in candidates_correct:
        b = drop_bound(reference_correct, ours, confidence)
        bounds.append(b)
        if not b.within(budget):
            return SequenceResult(bounds, len(bounds) - 1)
    return SequenceResult(bounds, len(bounds))
