"""The aggregators as pure functions: hand-computed cases, honest rounds and poisoned rounds.

Updates are seeded random tensors shaped like two exit heads (10 classes over 64 and 32
features): a common direction (what every honest device learns) plus per-device noise. These
are numeric tests of the aggregation maths, not accuracy claims.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.server.federated.aggregate import (
    AGGREGATORS,
    AggregatorError,
    aggregate,
    clip_norms,
    coordinate_median,
    fedavg,
    flatten,
    krum,
    norm_clipped_fedavg,
    param_names,
    trimmed_mean,
    unflatten,
)

F32 = npt.NDArray[np.float32]
Upd = dict[str, F32]

SHAPES = {
    "exit0.weight": (10, 64),
    "exit0.bias": (10,),
    "exit1.weight": (10, 32),
    "exit1.bias": (10,),
}
N_HONEST = 8
ATTACKS: dict[str, Callable[[Upd], Upd]] = {
    "scaled_x100": lambda u: {k: v * np.float32(100) for k, v in u.items()},
    "sign_flipped_x-10": lambda u: {k: v * np.float32(-10) for k, v in u.items()},
    "huge_constant": lambda u: {k: np.full_like(v, 1e3) for k, v in u.items()},
}
ROBUST: dict[str, dict[str, float]] = {
    "median": {},
    "trimmed_mean": {"trim": 0.2},
    "krum": {"f": 2, "m": 6},
}


def honest(seed: int = 14, n: int = N_HONEST) -> list[Upd]:
    """n updates: one common direction (sd 0.05) plus per-device noise (sd 0.02)."""
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(0, 0.05, s) for k, s in SHAPES.items()}
    return [
        {k: (direction[k] + rng.normal(0, 0.02, s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


def poisoned(attack: str) -> tuple[list[Upd], list[Upd], list[float]]:
    """10 updates, 2 of them (at positions 3 and 7) poisoned; the honest 8; sample counts."""
    good = honest()
    bad = [ATTACKS[attack](good[0]), ATTACKS[attack](good[1])]
    updates = [*good[:3], bad[0], *good[3:6], bad[1], *good[6:]]
    counts = [float(c) for c in np.random.default_rng(7).integers(50, 200, len(updates))]
    return updates, good, counts


def rel_err(result: Upd, reference: Upd) -> float:
    ref = flatten(reference)
    return float(np.linalg.norm(flatten(result) - ref) / np.linalg.norm(ref))


def small(*values: float) -> Upd:
    return {
        "w": np.array(values[:-1], np.float32).reshape(1, -1),
        "b": np.array(values[-1:], np.float32),
    }


def test_flatten_unflatten_round_trip_in_sorted_name_order() -> None:
    u = honest()[0]
    shuffled = {k: u[k] for k in reversed(list(u))}
    assert param_names(shuffled) == sorted(SHAPES)
    vec = flatten(shuffled)
    assert vec.dtype == np.float64 and vec.shape == (sum(int(np.prod(s)) for s in SHAPES.values()),)
    assert np.array_equal(vec, flatten(u))
    back = unflatten(vec, u)
    assert set(back) == set(u)
    for k in u:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], u[k])
    with pytest.raises(AggregatorError, match="does not hold"):
        unflatten(vec[:-1], u)


def test_fedavg_is_the_hand_computed_weighted_mean() -> None:
    ups = [small(1, 2, 3), small(3, 6, -3), small(5, 0, 9)]
    out = fedavg(ups, [1.0, 2.0, 1.0])
    # (1*[1,2,3] + 2*[3,6,-3] + 1*[5,0,9]) / 4 = [3, 3.5, 1.5]
    assert np.array_equal(out["w"], np.array([[3.0, 3.5]], np.float32))
    assert np.array_equal(out["b"], np.array([1.5], np.float32))
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float32


def test_fedavg_renormalises_over_the_devices_that_reported() -> None:
    ups = [small(1, 2, 3), small(3, 6, -3), small(5, 0, 9)]
    # Device 2 dropped out: the other two weigh 1/3 and 2/3, not 1/4 and 2/4.
    out = fedavg(ups[:2], [1.0, 2.0])
    assert np.allclose(out["w"], [[7 / 3, 14 / 3]]) and np.allclose(out["b"], [-1.0])
    assert np.array_equal(flatten(fedavg(ups, [2, 4, 2])), flatten(fedavg(ups, [1, 2, 1])))


@pytest.mark.parametrize(
    "weights",
    [[1.0, 0.0], [1.0, -2.0], [1.0, float("nan")], [1.0, float("inf")], [1.0], [1.0, 1.0, 1.0]],
)
def test_fedavg_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(AggregatorError, match="weights"):
        fedavg([small(1, 2, 3), small(3, 6, -3)], weights)


def test_median_and_trimmed_mean_hand_computed() -> None:
    ups = [small(1, 10, 0), small(2, -50, 0), small(3, 20, 0), small(4, 30, 0), small(100, 40, 1)]
    assert np.array_equal(coordinate_median(ups)["w"], [[3.0, 20.0]])
    assert np.array_equal(coordinate_median(ups[:4])["w"], [[2.5, 15.0]])
    # trim 0.2 of 5 drops one value at each end: mean(2, 3, 4) and mean(10, 20, 30).
    assert np.array_equal(trimmed_mean(ups, 0.2)["w"], [[3.0, 20.0]])
    # Any trim > 0 drops at least one per end; 0 is the plain mean.
    assert np.array_equal(trimmed_mean(ups, 0.01)["w"], [[3.0, 20.0]])
    assert np.allclose(trimmed_mean(ups, 0.0)["w"], [[22.0, 10.0]])
    # Too few to trim: n = 3 keeps the middle value, n = 2 the plain mean.
    assert np.array_equal(trimmed_mean(ups[:3], 0.4)["w"], [[2.0, 10.0]])
    assert np.array_equal(trimmed_mean(ups[:2], 0.4)["w"], [[1.5, -20.0]])
    with pytest.raises(AggregatorError, match="trim"):
        trimmed_mean(ups, 0.5)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_aggregators_stay_close_to_the_honest_mean(name: str) -> None:
    good = honest()
    err = rel_err(aggregate(name, good, None, **ROBUST[name]), fedavg(good, None))
    # Measured about 0.04-0.08 with per-device noise at 40% of the common direction.
    assert err < 0.15, err


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_two_poisoned_of_ten_are_outvoted_by_robust_aggregators(name: str, attack: str) -> None:
    updates, good, counts = poisoned(attack)
    err = rel_err(aggregate(name, updates, counts, **ROBUST[name]), fedavg(good, None))
    # Measured at most about 0.16 (median and trimmed mean; Krum keeps only honest updates).
    assert err < 0.25, err


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_plain_fedavg_is_far_off_under_poisoning(attack: str) -> None:
    updates, good, counts = poisoned(attack)
    # Measured from 2.2 (sign flip) to about 3900 (constant) with the same data.
    assert rel_err(fedavg(updates, counts), fedavg(good, None)) > 1.0


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_norm_clipped_fedavg_bounds_each_poisoned_pull(attack: str) -> None:
    updates, good, counts = poisoned(attack)
    bad = [3, 7]
    honest_mean = fedavg(
        [u for i, u in enumerate(updates) if i not in bad],
        [c for i, c in enumerate(counts) if i not in bad],
    )
    bound = 1.01 * max(float(np.linalg.norm(flatten(u))) for u in good)  # honest ones unclipped
    share = sum(counts[i] for i in bad) / sum(counts)
    # With honest updates unclipped: result - H = share * (mean of clipped poisoned - H),
    # so |result - H| / |H| <= share * (1 + bound / |H|): bounded influence, not none.
    limit = share * (1 + bound / float(np.linalg.norm(flatten(honest_mean))))
    err = rel_err(norm_clipped_fedavg(updates, counts, bound), honest_mean)
    assert err <= limit + 1e-6, (err, limit)
    assert rel_err(fedavg(updates, counts), honest_mean) > limit


def test_krum_picks_an_honest_update_and_multi_krum_their_mean() -> None:
    updates, good, _ = poisoned("sign_flipped_x-10")
    one = flatten(krum(updates, f=2))
    assert any(np.array_equal(one, flatten(u)) for u in good)
    assert rel_err(krum(updates, f=2, m=8), fedavg(good, None)) < 1e-6


def test_krum_needs_2f_plus_3_updates() -> None:
    with pytest.raises(AggregatorError, match=r"n >= 2f \+ 3 .*f=2 needs 7, got 6"):
        krum(honest(n=6), f=2)
    assert krum(honest(n=7), f=2)["exit0.weight"].shape == (10, 64)
    with pytest.raises(AggregatorError, match="m"):
        krum(honest(n=7), f=2, m=6)
    with pytest.raises(ValueError):  # AggregatorError is a ValueError
        aggregate("krum", honest(n=4), None, f=1)


def test_clip_norms_bounds_every_norm_and_leaves_small_ones_untouched() -> None:
    updates, _, _ = poisoned("scaled_x100")
    norms = [float(np.linalg.norm(flatten(u))) for u in updates]
    bound = float(np.median(norms))
    clipped = clip_norms(updates, bound)
    for u, c, norm in zip(updates, clipped, norms, strict=True):
        assert float(np.linalg.norm(flatten(c))) <= bound * (1 + 1e-6)  # float32 rounding
        if norm <= bound:
            assert all(np.array_equal(c[k], u[k]) and c[k] is not u[k] for k in u)
        else:  # same direction, shorter
            assert np.allclose(flatten(c) * norm / bound, flatten(u), rtol=1e-5)
    assert sum(n > bound for n in norms) >= 2
    with pytest.raises(AggregatorError, match="bound"):
        clip_norms(updates, 0.0)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_registered_aggregator_returns_float32_heads(name: str) -> None:
    every: dict[str, dict[str, float]] = {
        "trimmed_mean": {"trim": 0.2},
        "norm_clipped_fedavg": {"bound": 1.0},
        "krum": {"f": 2},
    }
    params = every.get(name, {})
    updates, _, counts = poisoned("scaled_x100")
    out = aggregate(name, updates, counts, **params)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        k: (s, np.dtype(np.float32)) for k, s in SHAPES.items()
    }
    again = aggregate(name, updates, counts, **params)
    assert all(out[k].tobytes() == again[k].tobytes() for k in out)  # deterministic


def test_registry_names_and_bad_calls() -> None:
    assert set(AGGREGATORS) == {"fedavg", "median", "trimmed_mean", "norm_clipped_fedavg", "krum"}
    good = honest()
    with pytest.raises(AggregatorError, match=r"unknown aggregator 'mean'.*fedavg"):
        aggregate("mean", good, None)
    with pytest.raises(AggregatorError, match=r"missing \['trim'\]"):
        aggregate("trimmed_mean", good, None)
    with pytest.raises(AggregatorError, match=r"unknown \['trim'\]"):
        aggregate("median", good, None, trim=0.1)
    with pytest.raises(AggregatorError, match="bad parameter"):
        aggregate("trimmed_mean", good, None, trim="0.2")
    with pytest.raises(AggregatorError, match="int"):
        aggregate("krum", good, None, f=1.5)


def test_mismatched_or_non_finite_updates_are_refused() -> None:
    good = honest(n=3)
    with pytest.raises(AggregatorError, match="no updates"):
        fedavg([], [])
    with pytest.raises(AggregatorError, match="update 1 has names"):
        coordinate_median([good[0], {k: v for k, v in good[1].items() if k != "exit1.bias"}])
    wrong = {**good[1], "exit0.bias": np.zeros(9, np.float32)}
    with pytest.raises(AggregatorError, match=r"update 1: exit0.bias shape \(9,\)"):
        coordinate_median([good[0], wrong])
    nan = {**good[2], "exit0.bias": np.full(10, np.nan, np.float32)}
    with pytest.raises(AggregatorError, match="NaN"):
        trimmed_mean([*good[:2], nan], 0.2)
