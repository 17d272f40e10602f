"""The interleaved timer: order, warm-up and per-round means, on a fake clock (no real time)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from edgefleet.server.optimize.latency import (
    compare,
    interleaved,
    medians,
    ratio_spread,
    round_ratios,
)


class FakeClock:
    """A clock that moves only when a contender 'works', by the cost it is given."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, int]] = []

    def __call__(self) -> float:
        return self.now

    def contender(self, name: str, cost_s: Callable[[int, int], float]) -> Callable[[int], None]:
        """A contender costing cost_s(item, nth call of it) seconds of fake time."""

        def run(item: int) -> None:
            nth = sum(1 for n, _ in self.calls if n == name)
            self.calls.append((name, item))
            self.now += cost_s(item, nth)

        return run


def test_round_robin_order_rotates_with_round_and_chunk() -> None:
    clock = FakeClock()
    runs = {k: clock.contender(k, lambda _i, _n: 0.001) for k in "abc"}
    interleaved(runs, range(4), rounds=2, chunk=2, warmup=1, clock=clock)
    warm, timed = clock.calls[:3], clock.calls[3:]
    assert warm == [("a", 0), ("b", 0), ("c", 0)]
    order = [name for name, item in timed if item in (0, 2)]  # first item of each chunk
    # round 0: chunk 0 a,b,c; chunk 1 b,c,a. round 1: chunk 0 b,c,a; chunk 1 c,a,b.
    assert order == [*"abc", *"bca", *"bca", *"cab"]
    # Every contender sees every item once per round, in item order within a chunk.
    for name in "abc":
        assert [i for n, i in timed if n == name] == [0, 1, 2, 3] * 2


def test_per_round_values_are_mean_ms_per_item() -> None:
    clock = FakeClock()
    # "slow" costs 2 ms per item, 4 ms in its second timed round; "fast" 1 ms + 0.5 ms per index.
    runs = {
        "slow": clock.contender("slow", lambda _i, n: 0.004 if 3 <= n < 6 else 0.002),
        "fast": clock.contender("fast", lambda i, _n: 0.001 + 0.0005 * i),
    }
    per_round = interleaved(runs, range(3), rounds=3, chunk=2, warmup=0, clock=clock)
    assert per_round["slow"] == pytest.approx([2.0, 4.0, 2.0])
    assert per_round["fast"] == pytest.approx([1.5, 1.5, 1.5])
    assert medians(per_round) == pytest.approx({"slow": 2.0, "fast": 1.5})
    assert round_ratios(per_round, "slow", "fast") == pytest.approx([4 / 3, 8 / 3, 4 / 3])
    spread = ratio_spread(per_round, lambda lat: {"r": lat["slow"] / lat["fast"]})
    assert spread == {"r": pytest.approx([4 / 3, 8 / 3])}


def test_refuses_what_it_cannot_time() -> None:
    run = {"a": FakeClock().contender("a", lambda _i, _n: 0.0)}
    with pytest.raises(ValueError, match="no items"):
        interleaved(run, [], rounds=1, chunk=1, warmup=0)
    with pytest.raises(ValueError, match="rounds"):
        interleaved(run, [1], rounds=0, chunk=1, warmup=0)


def test_compare_runs_every_sample_through_every_runner() -> None:
    seen: dict[str, int] = {"x": 0, "y": 0}

    def count(name: str) -> Callable[[object], object]:
        def run(_s: object) -> object:
            seen[name] += 1
            return None

        return run

    samples = [np.zeros(1, np.float32) for _ in range(5)]
    lat = compare({"x": count("x"), "y": count("y")}, samples, rounds=3, warmup=2)
    assert set(lat) == {"x", "y"} and all(v >= 0.0 for v in lat.values())
    assert seen == {"x": 2 + 3 * 5, "y": 2 + 3 * 5}
