"""Exit confidence rules and exit decisions (pure numerics)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.runtime.confidence import confidence, decide_exits, softmax


def test_softmax_is_stable_and_normalised() -> None:
    p = softmax([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]])
    assert np.allclose(p.sum(axis=1), 1.0)
    assert np.allclose(p[0], [0.5, 0.5, 0.0])
    assert np.allclose(p[1], 1 / 3)


@pytest.mark.parametrize(
    ("rule", "certain", "uniform", "example"),
    [
        ("max_softmax", 1.0, 0.25, 0.7),
        ("margin", 1.0, 0.0, 0.7 - 0.1),
        ("entropy", 1.0, 0.0, 1 + (0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1)) / np.log(4)),
    ],
)
def test_rules(rule: str, certain: float, uniform: float, example: float) -> None:
    probs = np.array([[1.0, 0, 0, 0], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]])
    got = confidence(probs, rule)  # type: ignore[arg-type]
    assert got == pytest.approx([certain, uniform, example])
    assert ((got >= 0) & (got <= 1)).all()


def test_confidence_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        confidence([[1.0]], "max_softmax")
    with pytest.raises(ValueError, match="unknown confidence rule 'vote'"):
        confidence([[0.5, 0.5]], "vote")  # type: ignore[arg-type]


def test_decide_exits_takes_first_passing_exit() -> None:
    c0 = np.array([0.99, 0.5, 0.5, 0.2])
    c1 = np.array([0.1, 0.95, 0.5, 0.99])
    taken = decide_exits([c0, c1], [0.9, 0.9])
    assert taken.tolist() == [0, 1, 2, 1]


def test_decide_exits_none_disables_an_exit() -> None:
    c0 = np.array([0.99, 0.99])
    c1 = np.array([0.1, 0.95])
    assert decide_exits([c0, c1], [None, 0.9]).tolist() == [2, 1]


def test_threshold_boundary_is_inclusive() -> None:
    assert decide_exits([np.array([0.8])], [0.8]).tolist() == [0]


def test_decide_exits_length_mismatch() -> None:
    with pytest.raises(ValueError, match="1 confidence arrays for 2 thresholds"):
        decide_exits([np.array([0.5])], [0.5, 0.5])


def test_exit_decision_equals_softmax_then_confidence() -> None:
    from edgefleet.agent.runtime.staged import exit_decision

    rng = np.random.default_rng(3)
    for scale in (0.1, 1.0, 10.0, 100.0):
        for _ in range(200):
            z = (rng.standard_normal(10) * scale).astype(np.float32)
            probs = softmax(z[None, :])
            for rule in ("max_softmax", "margin", "entropy"):
                cls, top1, score = exit_decision(z[None, :], rule)
                assert cls == int(probs[0].argmax())
                assert top1 == float(probs[0].max())
                assert score == float(confidence(probs, rule)[0])
