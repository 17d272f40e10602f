"""Softmax-regression heads: gradient, local SGD on real digits, budget, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import log_loss

from edgefleet.agent.federated import HeadWeights, evaluate, loss_and_grad, train_head

from .digits import Split, digits_split

CLASSES = 10


@pytest.fixture(scope="module")
def digits() -> Split:
    return digits_split()


def zeros(dim: int = 64) -> HeadWeights:
    return HeadWeights(np.zeros((CLASSES, dim), np.float32), np.zeros(CLASSES, np.float32))


def fit(base: HeadWeights, x: np.ndarray, y: np.ndarray, seed: int = 0, **kw: float) -> HeadWeights:
    opts: dict[str, float] = {"epochs": 20, "lr": 0.5, "weight_decay": 1e-4, "prox_mu": 0.0}
    opts.update(kw)
    result = train_head(
        base,
        x,
        y,
        epochs=int(opts["epochs"]),
        lr=opts["lr"],
        batch_size=32,
        weight_decay=opts["weight_decay"],
        prox_mu=opts["prox_mu"],
        rng=np.random.default_rng(seed),
    )
    return result.head


def skewed_head(digits: Split) -> HeadWeights:
    """A poor start: a head fitted only on digits 0-4 (it never predicts 5-9)."""
    x_tr, _, y_tr, _ = digits
    keep = y_tr < 5
    return fit(zeros(), x_tr[keep], y_tr[keep])


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_matches_central_differences(weighted: bool) -> None:
    rng = np.random.default_rng(3)
    c, d, n = 4, 5, 12
    head = HeadWeights(rng.normal(size=(c, d)), rng.normal(size=c))
    anchor = HeadWeights(rng.normal(size=(c, d)), rng.normal(size=c))
    x, y = rng.normal(size=(n, d)), rng.integers(0, c, size=n)
    sw = rng.uniform(0.1, 2.0, size=n) if weighted else None
    kw = {"weight_decay": 0.3, "prox_mu": 0.7, "anchor": anchor, "sample_weight": sw}

    _, grad = loss_and_grad(head, x, y, **kw)  # type: ignore[arg-type]
    eps = 1e-6
    for name, shape in (("weight", (c, d)), ("bias", (c,))):
        numeric = np.zeros(shape)
        for idx in itertools.product(*map(range, shape)):
            arrays = {"weight": head.weight.copy(), "bias": head.bias.copy()}
            arrays[name][idx] += eps
            up, _ = loss_and_grad(HeadWeights(**arrays), x, y, **kw)  # type: ignore[arg-type]
            arrays[name][idx] -= 2 * eps
            down, _ = loss_and_grad(HeadWeights(**arrays), x, y, **kw)  # type: ignore[arg-type]
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(getattr(grad, name), numeric, rtol=1e-6, atol=1e-8)


def test_float32_gradient_agrees_with_float64() -> None:
    rng = np.random.default_rng(4)
    head64 = HeadWeights(rng.normal(size=(10, 64)), rng.normal(size=10))
    head32 = HeadWeights(head64.weight.astype(np.float32), head64.bias.astype(np.float32))
    x, y = rng.normal(size=(50, 64)), rng.integers(0, 10, size=50)
    loss64, g64 = loss_and_grad(head64, x, y, weight_decay=0.01, prox_mu=0.5, anchor=head64)
    loss32, g32 = loss_and_grad(head32, x, y, weight_decay=0.01, prox_mu=0.5, anchor=head32)
    assert g32.weight.dtype == np.float32
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    np.testing.assert_allclose(g32.weight, g64.weight, rtol=1e-3, atol=1e-5)


def test_huge_logits_stay_finite() -> None:
    head = HeadWeights(np.full((3, 2), 1e4, np.float32) * [[1, 0], [0, 1], [-1, -1]], np.zeros(3))
    loss, grad = loss_and_grad(head, [[5.0, -5.0]], [1], weight_decay=0.0)
    assert np.isfinite(loss) and loss > 1e4  # wrong class by a logit gap of 1e5
    assert np.isfinite(grad.weight).all()


def test_loss_matches_sklearn_log_loss(digits: Split) -> None:
    x_tr, x_te, y_tr, y_te = digits
    head = fit(zeros(), x_tr, y_tr, epochs=2)
    loss, acc = evaluate(head, x_te, y_te)
    logits = x_te @ head.weight.T + head.bias
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    assert loss == pytest.approx(log_loss(y_te, probs, labels=range(10)), rel=1e-4)
    assert acc == pytest.approx(float((probs.argmax(axis=1) == y_te).mean()))
    objective, _ = loss_and_grad(head, x_te, y_te, weight_decay=0.0)
    assert objective == pytest.approx(loss, rel=1e-6)


def test_training_from_zeros_improves_held_out_accuracy(digits: Split) -> None:
    x_tr, x_te, y_tr, y_te = digits
    _, before = evaluate(zeros(), x_te, y_te)
    head = fit(zeros(), x_tr, y_tr)
    _, after = evaluate(head, x_te, y_te)
    assert head.weight.dtype == np.float32
    assert before < 0.15 and after > 0.93


def test_fine_tuning_a_skewed_head_on_all_classes_improves_it(digits: Split) -> None:
    x_tr, x_te, y_tr, y_te = digits
    base = skewed_head(digits)
    _, before = evaluate(base, x_te, y_te)
    result = train_head(
        base,
        x_tr,
        y_tr,
        epochs=5,
        lr=0.5,
        batch_size=32,
        weight_decay=1e-4,
        prox_mu=0.0,
        rng=np.random.default_rng(1),
    )
    _, after = evaluate(result.head, x_te, y_te)
    assert before < 0.55 and after > before + 0.35
    assert result.steps == 5 * -(-len(y_tr) // 32) and result.epochs_done == 5
    assert not result.stopped_by_budget
    assert result.train_loss == pytest.approx(evaluate(result.head, x_tr, y_tr)[0])


def test_weight_decay_shrinks_the_weights(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    plain = np.linalg.norm(fit(zeros(), x_tr, y_tr, weight_decay=0.0).weight)
    decayed = np.linalg.norm(fit(zeros(), x_tr, y_tr, weight_decay=0.05).weight)
    assert decayed < 0.6 * plain


def test_large_prox_mu_keeps_the_head_near_its_anchor(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    base = skewed_head(digits)

    def moved(prox_mu: float) -> float:
        head = fit(base, x_tr, y_tr, epochs=5, lr=0.1, prox_mu=prox_mu)
        return float(np.sqrt(sum(np.vdot(d, d) for d in head.delta(base).values())))

    free, held = moved(0.0), moved(10.0)
    assert free > 1.0
    assert held < 0.15 * free


class TickClock:
    """A fake CPU clock: each read returns the next whole second."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return float(self.reads - 1)


def test_cpu_budget_stops_training_between_batches(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    x, y = x_tr[:90], y_tr[:90]  # 3 batches of 32 per epoch
    clock = TickClock()
    result = train_head(
        zeros(), x, y, epochs=10, lr=0.5, batch_size=32, weight_decay=0.0, prox_mu=0.0,
        rng=np.random.default_rng(0), deadline=5.0, clock=clock,
    )
    # Reads 0..4 come before the deadline (5 batches run); read 5 reaches it.
    assert (result.steps, result.epochs_done, result.stopped_by_budget) == (5, 1, True)
    assert clock.reads == 6


def test_budget_stop_keeps_the_work_done(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    x, y = x_tr[:160], y_tr[:160]  # 5 batches of 32 per epoch
    stopped = train_head(
        zeros(), x, y, epochs=10, lr=0.5, batch_size=32, weight_decay=0.0, prox_mu=0.0,
        rng=np.random.default_rng(0), deadline=5.0, clock=TickClock(),
    )
    one_epoch = train_head(
        zeros(), x, y, epochs=1, lr=0.5, batch_size=32, weight_decay=0.0, prox_mu=0.0,
        rng=np.random.default_rng(0),
    )
    assert (stopped.steps, stopped.epochs_done, stopped.stopped_by_budget) == (5, 1, True)
    np.testing.assert_array_equal(stopped.head.weight, one_epoch.head.weight)
    assert stopped.train_loss == one_epoch.train_loss


def test_no_deadline_never_reads_the_clock(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits

    def forbidden() -> float:
        raise AssertionError("clock read without a deadline")

    result = train_head(
        zeros(),
        x_tr[:90],
        y_tr[:90],
        epochs=2,
        lr=0.5,
        batch_size=32,
        weight_decay=0.0,
        prox_mu=0.0,
        rng=np.random.default_rng(0),
        clock=forbidden,
    )
    assert (result.steps, result.epochs_done, result.stopped_by_budget) == (6, 2, False)


def test_same_rng_gives_identical_results(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    a = fit(zeros(), x_tr, y_tr, seed=7, epochs=3)
    b = fit(zeros(), x_tr, y_tr, seed=7, epochs=3)
    c = fit(zeros(), x_tr, y_tr, seed=8, epochs=3)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)


def test_training_leaves_the_base_untouched(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    base = skewed_head(digits)
    saved = base.copy()
    fit(base, x_tr, y_tr, epochs=1)
    np.testing.assert_array_equal(base.weight, saved.weight)
    np.testing.assert_array_equal(base.bias, saved.bias)


def test_delta_apply_and_npz_round_trip(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    base = skewed_head(digits)
    new = fit(base, x_tr, y_tr, epochs=1)
    delta = new.delta(base)
    assert set(delta) == {"weight", "bias"} and delta["weight"].dtype == np.float32
    rebuilt = base.apply(delta)
    np.testing.assert_allclose(rebuilt.weight, new.weight, atol=1e-6)
    np.testing.assert_allclose(rebuilt.bias, new.bias, atol=1e-6)
    loaded = HeadWeights.from_npz_bytes(new.to_npz_bytes())
    np.testing.assert_array_equal(loaded.weight, new.weight)
    with pytest.raises(ValueError, match="keys"):
        base.apply({"weight": delta["weight"]})
    with pytest.raises(ValueError, match="does not fit"):
        base.apply({"weight": delta["weight"][:, :3], "bias": delta["bias"]})


def test_bad_inputs_are_refused() -> None:
    head = zeros(4)
    with pytest.raises(ValueError, match="labels must lie"):
        evaluate(head, np.zeros((2, 4)), [0, 10])
    with pytest.raises(ValueError, match="do not fit"):
        evaluate(head, np.zeros((2, 5)), [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        evaluate(head, np.zeros((0, 4)), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="anchor"):
        loss_and_grad(head, np.zeros((2, 4)), [0, 1], weight_decay=0.0, prox_mu=1.0)
    with pytest.raises(ValueError, match="do not match"):
        HeadWeights(np.zeros((3, 4)), np.zeros(4))
