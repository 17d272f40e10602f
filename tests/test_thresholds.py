"""Exit threshold calibration: pure numbers on synthetic validation measurements."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.agent.runtime.confidence import decide_exits
from edgefleet.server.optimize.thresholds import (
    PointStats,
    between,
    choose_default,
    evaluate_thresholds,
    pareto_operating_points,
    per_sample_correct,
)

Bools = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]


def _random_case(n_exits: int, n: int, seed: int) -> tuple[list[Floats], list[Bools], list[float]]:
    """Exits that get better with depth, confidence that is higher when the exit is right."""
    rng = np.random.default_rng(seed)
    conf: list[Floats] = []
    correct: list[Bools] = []
    for e in range(n_exits + 1):
        right = rng.random(n) < 0.5 + 0.4 * e / max(n_exits, 1)
        correct.append(right)
        if e < n_exits:
            conf.append(np.where(right, rng.beta(5, 2, n), rng.beta(2, 4, n)))
    cost = np.cumsum(rng.integers(1, 10, n_exits + 1) * 1_000_000).astype(float).tolist()
    return conf, correct, cost


def _assert_monotone(points: list[PointStats]) -> None:
    acc = [p.accuracy for p in points]
    cost = [p.mean_cost for p in points]
    # A Pareto front from accurate to fast: both strictly fall along the list.
    assert all(a > b for a, b in itertools.pairwise(acc)), acc
    assert all(a > b for a, b in itertools.pairwise(cost)), cost


def test_confident_half_exits_exactly() -> None:
    rng = np.random.default_rng(0)
    n = 200
    sure = rng.permutation(np.arange(n) < n // 2)
    conf = np.where(sure, 0.95, 0.30)
    correct = [sure.copy(), np.ones(n, dtype=bool)]  # exit 0 right exactly where it is sure
    cost = [1.0, 4.0]
    points = pareto_operating_points([conf], correct, cost)
    # Disabled (acc 1, cost 4) is dominated by letting the sure half out (acc 1, cost 2.5);
    # letting everyone out is the fast end (acc 0.5, cost 1). Thresholds sit halfway between
    # observed confidences (0.625 between 0.30 and 0.95; 0.15 below the lowest), never on one.
    assert [(p.thresholds, p.accuracy, p.mean_cost) for p in points] == [
        ((0.625,), 1.0, 2.5),
        ((0.15,), 0.5, 1.0),
    ]
    assert points[0].exit_rates == (0.5, 0.5)
    chosen, ok = choose_default(points, reference_accuracy=1.0, max_drop=0.01)
    assert (chosen, ok) == (0, True)
    taken = decide_exits([conf], list(points[chosen].thresholds))
    assert np.array_equal(taken == 0, sure)


def test_overconfident_exit_leaves_the_disabled_point_first() -> None:
    rng = np.random.default_rng(1)
    n = 100
    wrong = rng.permutation(np.arange(n) < 40)
    conf = np.where(wrong, 0.99, 0.6)  # sure exactly when it is wrong
    final = np.ones(n, dtype=bool)
    final[:7] = False
    points = pareto_operating_points([conf], [~wrong, final], [2.0, 10.0])
    first = points[0]
    assert first.thresholds == (None,)
    assert first.accuracy == pytest.approx(0.93)
    assert first.mean_cost == 10.0
    assert first.exit_rates == (0.0, 1.0)
    _assert_monotone(points)


def test_none_disables_an_exit() -> None:
    conf, correct, cost = _random_case(2, 300, seed=2)
    only_final = evaluate_thresholds(conf, correct, cost, [None, None])
    assert only_final.exit_rates == (0.0, 0.0, 1.0)
    assert only_final.accuracy == pytest.approx(correct[2].mean())
    assert only_final.mean_cost == cost[2]
    second = evaluate_thresholds(conf, correct, cost, [None, 0.0])
    assert second.exit_rates == (0.0, 1.0, 0.0)
    assert second.accuracy == pytest.approx(correct[1].mean())
    assert second.mean_cost == cost[1]
    first = evaluate_thresholds(conf, correct, cost, [0.0, 0.0])
    assert first.exit_rates == (1.0, 0.0, 0.0)


def test_evaluate_mixes_exits_by_hand() -> None:
    conf = [np.array([0.9, 0.2, 0.2, 0.2]), np.array([0.1, 0.8, 0.1, 0.1])]
    correct = [
        np.array([True, False, False, False]),
        np.array([False, False, True, True]),
        np.array([False, True, False, True]),
    ]
    got = evaluate_thresholds(conf, correct, [1.0, 2.0, 5.0], [0.5, 0.5])
    # Sample 0 leaves at exit 0 (right), 1 at exit 1 (wrong), 2 and 3 at the end (2 wrong).
    assert got.exit_rates == (0.25, 0.25, 0.5)
    assert got.accuracy == 0.5
    assert got.mean_cost == (1 + 2 + 5 + 5) / 4


@pytest.mark.parametrize("n_exits", [1, 2, 3])
def test_grid_front_is_monotone_and_consistent(n_exits: int) -> None:
    conf, correct, cost = _random_case(n_exits, 500, seed=10 + n_exits)
    points = pareto_operating_points(conf, correct, cost)
    assert 2 <= len(points) <= 8
    _assert_monotone(points)
    # Each point's numbers are what decide_exits gives for its thresholds.
    for p in points:
        assert evaluate_thresholds(conf, correct, cost, p.thresholds) == p
    disabled = evaluate_thresholds(conf, correct, cost, [None] * n_exits)
    assert points[0].accuracy >= disabled.accuracy
    assert points[-1].mean_cost == cost[0]  # fastest: everything leaves at exit 0
    assert points[-1].exit_rates[0] == 1.0


def test_grid_front_matches_brute_force() -> None:
    conf, correct, cost = _random_case(2, 120, seed=5)
    k = 9
    points = pareto_operating_points(conf, correct, cost, candidates_per_exit=k, max_points=10**6)
    cands = [
        [None, *sorted({float(v) for v in np.quantile(c, np.linspace(0, 1, k), method="lower")})]
        for c in conf
    ]
    every = [evaluate_thresholds(conf, correct, cost, t) for t in itertools.product(*cands)]
    front = {
        (p.accuracy, p.mean_cost)
        for p in every
        if not any(
            q.accuracy >= p.accuracy
            and q.mean_cost <= p.mean_cost
            and (q.accuracy, q.mean_cost) != (p.accuracy, p.mean_cost)
            for q in every
        )
    }
    assert {(p.accuracy, p.mean_cost) for p in points} == front


def test_greedy_search_for_many_exits() -> None:
    conf, correct, cost = _random_case(3, 400, seed=7)
    grid = pareto_operating_points(conf, correct, cost, search="grid", max_points=10**6)
    greedy = pareto_operating_points(conf, correct, cost, search="greedy", max_points=10**6)
    _assert_monotone(greedy)
    # Greedy can only miss points: the full grid's front weakly dominates each of its points.
    for p in greedy:
        assert any(q.accuracy >= p.accuracy and q.mean_cost <= p.mean_cost for q in grid)
    assert greedy[0].accuracy == grid[0].accuracy
    assert greedy[-1].mean_cost == grid[-1].mean_cost == cost[0]

    conf, correct, cost = _random_case(6, 500, seed=8)
    points = pareto_operating_points(conf, correct, cost)
    assert len(points) == 8
    _assert_monotone(points)
    disabled = evaluate_thresholds(conf, correct, cost, [None] * 6)
    assert points[0].accuracy >= disabled.accuracy
    assert points[-1].mean_cost == cost[0]


def test_three_exits_are_deterministic() -> None:
    # Speed is for the benchmarks to measure; a unit test checks: same input, same points.
    conf, correct, cost = _random_case(3, 500, seed=9)
    first = pareto_operating_points(conf, correct, cost)
    assert first and pareto_operating_points(conf, correct, cost) == first


def test_thinning_keeps_both_ends() -> None:
    conf, correct, cost = _random_case(2, 500, seed=3)
    full = pareto_operating_points(conf, correct, cost, max_points=10**6)
    assert len(full) > 8
    thin = pareto_operating_points(conf, correct, cost, max_points=3)
    assert len(thin) == 3
    assert thin[0] == full[0] and thin[-1] == full[-1]
    assert thin[1] in full
    one = pareto_operating_points(conf, correct, cost, max_points=1)
    assert one == [full[0]]


def _point(acc: float, cost: float) -> PointStats:
    return PointStats(thresholds=(0.5,), accuracy=acc, mean_cost=cost, exit_rates=(0.5, 0.5))


def test_choose_default_respects_the_budget() -> None:
    points = [_point(0.95, 10.0), _point(0.93, 7.0), _point(0.90, 5.0), _point(0.80, 2.0)]
    assert choose_default(points, 0.95, 0.02) == (1, True)
    assert choose_default(points, 0.95, 0.05) == (2, True)
    # 0.8 - 0.1 is 0.7000000000000001 in floats: the 0.70 point must still count as in budget.
    assert choose_default([*points, _point(0.70, 1.0)], 0.80, 0.10) == (4, True)
    assert choose_default(points, 0.95, 0.0) == (0, True)
    assert choose_default(points, 0.90, 0.10) == (3, True)
    # Nothing within 0.01 of 0.99: fall back to the most accurate point, flagged.
    assert choose_default(points, 0.99, 0.01) == (0, False)
    with pytest.raises(ValueError, match="no operating points"):
        choose_default([], 0.9, 0.01)


def test_operating_point_for_the_manifest() -> None:
    conf, correct, cost = _random_case(2, 200, seed=4)
    p = pareto_operating_points(conf, correct, cost)[1]
    op = p.to_operating_point("balanced")
    assert op.thresholds == list(p.thresholds)
    assert op.val_accuracy == p.accuracy and op.expected_macs == p.mean_cost
    assert op.exit_rates is not None and sum(op.exit_rates) == pytest.approx(1.0)


def test_no_early_exits() -> None:
    final = np.array([True, False, True, True])
    assert pareto_operating_points([], [final], [3.0]) == [
        PointStats(thresholds=(), accuracy=0.75, mean_cost=3.0, exit_rates=(1.0,))
    ]


def test_bad_measurements_name_the_problem() -> None:
    conf, correct, cost = _random_case(2, 50, seed=6)
    with pytest.raises(ValueError, match="need 3 correct arrays and costs"):
        evaluate_thresholds(conf, correct[:2], cost, [None, None])
    with pytest.raises(ValueError, match="non-decreasing"):
        evaluate_thresholds(conf, correct, [5.0, 2.0, 9.0], [None, None])
    with pytest.raises(ValueError, match=r"conf\[1\] has shape \(49,\)"):
        evaluate_thresholds([conf[0], conf[1][:49]], correct, cost, [None, None])
    with pytest.raises(ValueError, match=r"correct\[0\] must be bool"):
        evaluate_thresholds(conf, [correct[0].astype(int), *correct[1:]], cost, [None, None])
    with pytest.raises(ValueError, match="3 thresholds for 2 early exit"):
        evaluate_thresholds(conf, correct, cost, [None, None, None])


def test_thresholds_never_sit_on_an_observed_confidence() -> None:
    # A rounding difference on a device (another BLAS) must not move a frame across a
    # threshold: every threshold lies strictly between observed confidences.
    rng = np.random.default_rng(3)
    conf = [rng.uniform(0.1, 1.0, 300), rng.uniform(0.1, 1.0, 300)]
    correct = [rng.uniform(size=300) < 0.8, rng.uniform(size=300) < 0.9, np.ones(300, bool)]
    points = pareto_operating_points(conf, correct, [1.0, 2.0, 4.0])
    seen = set(np.concatenate(conf).tolist())
    for p in points:
        for t in p.thresholds:
            assert t is None or t not in seen
        # ... and the figures are what the thresholds give, re-evaluated from scratch.
        again = evaluate_thresholds(conf, correct, [1.0, 2.0, 4.0], p.thresholds)
        assert again == p


def test_between_splits_like_the_value() -> None:
    conf = np.array([0.2, 0.5, 0.5, 0.9])
    assert between(conf, 0.5) == 0.35
    assert between(conf, 0.9) == 0.7
    assert between(conf, 0.2) == 0.1  # nothing below: halfway to zero


def test_per_sample_correct_follows_the_exit_taken() -> None:
    conf = [np.array([0.9, 0.1, 0.9])]
    correct = [np.array([True, True, False]), np.array([False, False, True])]
    assert per_sample_correct(conf, correct, (0.5,)).tolist() == [True, False, False]
    assert per_sample_correct(conf, correct, (None,)).tolist() == [False, False, True]
