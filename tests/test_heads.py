"""Exit heads: softmax regression fitted on scikit-learn's real 8x8 digits."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from edgefleet.server.optimize.heads import (
    LinearHead,
    accuracy,
    fit_softmax_regression,
    fold_standardization,
    loss_and_grad,
    select_l2,
    standardization,
)

Split = tuple[
    npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]


@pytest.fixture(scope="module")
def digits() -> Split:
    """1797 real 8x8 digit images (64 features, 10 classes), 70/30 stratified split, seed 0."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_tr, x_te, y_tr.astype(np.int64), y_te.astype(np.int64)


def test_digits_accuracy_matches_sklearn(digits: Split) -> None:
    x_tr, x_te, y_tr, y_te = digits
    l2 = 1e-3
    head = fit_softmax_regression(x_tr, y_tr, 10, l2=l2)
    ours = accuracy(head, x_te, y_te)
    # The same objective in sklearn's terms: C * sum(CE) + ||W||^2 / 2, C = 1 / (l2 * N).
    ref = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0 / (l2 * len(y_tr)), max_iter=5000)
    )
    # One BLAS thread, as in our fit: threaded OpenBLAS crawls on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="blas"):
        ref.fit(x_tr, y_tr)
    theirs = float(ref.score(x_te, y_te))
    assert ours >= 0.93
    assert abs(ours - theirs) <= 0.02
    assert head.weight.dtype == np.float32 and head.weight.shape == (10, 64)
    assert head.bias.dtype == np.float32 and head.bias.shape == (10,)
    assert 0 < head.n_iter < 500


def test_fit_is_deterministic(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    a = fit_softmax_regression(x_tr, y_tr, 10, seed=3)
    b = fit_softmax_regression(x_tr, y_tr, 10, seed=3)
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)


def test_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 5))
    y = rng.integers(0, 3, size=20)
    w = rng.normal(size=(3, 5))
    b = rng.normal(size=3)
    l2 = 0.3
    _, gw, gb = loss_and_grad(w, b, x, y, l2)
    h = 1e-6
    num_w = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        step = np.zeros_like(w)
        step[idx] = h
        num_w[idx] = (
            loss_and_grad(w + step, b, x, y, l2)[0] - loss_and_grad(w - step, b, x, y, l2)[0]
        ) / (2 * h)
    num_b = np.array(
        [
            (loss_and_grad(w, b + h * e, x, y, l2)[0] - loss_and_grad(w, b - h * e, x, y, l2)[0])
            / (2 * h)
            for e in np.eye(3)
        ]
    )
    assert np.allclose(gw, num_w, atol=1e-7)
    assert np.allclose(gb, num_b, atol=1e-7)


def test_loss_value_by_hand() -> None:
    # Two classes, zero weights: CE = log 2; l2 term = 0.5 * 0.1 * (1 + 4).
    w = np.array([[1.0, 0.0], [0.0, 2.0]])
    x = np.zeros((4, 2))
    loss, _, _ = loss_and_grad(w, np.zeros(2), x, np.array([0, 1, 1, 0]), 0.1)
    assert loss == pytest.approx(np.log(2) + 0.25)


def test_folding_equals_the_standardised_model() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 5.0, size=(50, 6))
    w = rng.normal(size=(4, 6))
    b = rng.normal(size=4)
    mean, std = standardization(x)
    w_raw, b_raw = fold_standardization(w, b, mean, std)
    assert np.allclose(x @ w_raw.T + b_raw, ((x - mean) / std) @ w.T + b, atol=1e-10)


def test_fitted_head_works_on_raw_features(digits: Split) -> None:
    x_tr, x_te, y_tr, _ = digits
    # Fitting on features standardised outside gives the z-space model; the raw head must
    # produce the same logits on raw features.
    mean, std = standardization(x_tr)
    z_head = fit_softmax_regression((x_tr - mean) / std, y_tr, 10)
    raw_head = fit_softmax_regression(x_tr, y_tr, 10)
    z_logits = z_head.logits((x_te - mean) / std)
    raw_logits = raw_head.logits(x_te)
    assert np.abs(z_logits - raw_logits).max() < 0.05 * np.abs(z_logits).max()
    assert (z_logits.argmax(axis=1) == raw_logits.argmax(axis=1)).mean() > 0.99


def test_npz_round_trip_uses_the_bundle_names(digits: Split) -> None:
    x_tr, x_te, y_tr, _ = digits
    head = fit_softmax_regression(x_tr, y_tr, 10)
    data = head.to_npz_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["bias", "weight"]
        assert arrays["weight"].dtype == np.float32
    back = LinearHead.from_npz_bytes(data)
    assert np.array_equal(back.weight, head.weight) and np.array_equal(back.bias, head.bias)
    assert np.array_equal(back.logits(x_te), head.logits(x_te))
    buf = io.BytesIO()
    np.savez(buf, weight=head.weight)
    with pytest.raises(ValueError, match="lacks array 'bias'"):
        LinearHead.from_npz_bytes(buf.getvalue())


def test_warm_start_converges_faster(digits: Split) -> None:
    x_tr, x_te, y_tr, y_te = digits
    # Federated fine-tuning in miniature: a head fitted on 90% of the data, then refined on all
    # of it, needs fewer iterations than fitting from scratch (measured 59 vs 77) and ends as
    # good; restarting from the converged head stops almost at once.
    part = int(len(y_tr) * 0.9)
    first = fit_softmax_regression(x_tr[:part], y_tr[:part], 10)
    cold = fit_softmax_regression(x_tr, y_tr, 10)
    warm = fit_softmax_regression(x_tr, y_tr, 10, init=(first.weight, first.bias))
    assert warm.n_iter < 0.9 * cold.n_iter
    assert abs(accuracy(warm, x_te, y_te) - accuracy(cold, x_te, y_te)) <= 0.01
    again = fit_softmax_regression(x_tr, y_tr, 10, init=(cold.weight, cold.bias))
    assert again.n_iter <= 3 < cold.n_iter


def test_constant_feature_and_absent_class(digits: Split) -> None:
    x_tr, x_te, y_tr, y_te = digits
    keep = y_tr != 9
    x = np.hstack([x_tr[keep], np.full((int(keep.sum()), 1), 1e6)])
    head = fit_softmax_regression(x, y_tr[keep], 10)
    assert np.isfinite(head.weight).all() and np.isfinite(head.bias).all()
    test = np.hstack([x_te, np.full((len(y_te), 1), 1e6)])
    logits = head.logits(test)
    assert np.isfinite(logits).all()
    assert not (logits.argmax(axis=1) == 9).any()
    seen = y_te != 9
    assert accuracy(head, test[seen], y_te[seen]) >= 0.93


def test_bad_input_names_the_problem() -> None:
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\)"):
        fit_softmax_regression(x, np.array([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="N=4 rows but labels have N=3"):
        fit_softmax_regression(x, np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="must be integers"):
        fit_softmax_regression(x, np.array([0.0, 1.0, 2.0, 0.0]), 3)
    with pytest.raises(ValueError, match="2-D"):
        fit_softmax_regression(np.zeros(4), np.array([0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_softmax_regression(np.full((4, 3), np.nan), np.array([0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match=r"init weight \(2, 3\)"):
        fit_softmax_regression(x, np.array([0, 1, 2, 0]), 3, init=(np.zeros((2, 3)), np.zeros(2)))


def test_select_l2_by_validation_accuracy(digits: Split) -> None:
    x_tr, _, y_tr, _ = digits
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=0.3, random_state=1, stratify=y_tr
    )
    grid = (1e-4, 1e-3, 1e-2, 1e-1)
    chosen = select_l2(x_fit, y_fit, x_val, y_val, 10, grid)
    scores = {
        l2: accuracy(fit_softmax_regression(x_fit, y_fit, 10, l2=l2), x_val, y_val) for l2 in grid
    }
    # 0.1 underfits the digits; the choice is the best of the grid, the larger l2 on a tie.
    assert chosen != 0.1
    assert scores[chosen] == max(scores.values())
    assert all(scores[l2] < scores[chosen] for l2 in grid if l2 > chosen)


def test_select_l2_ties_go_to_the_larger_value() -> None:
    # Two far-apart clusters: every l2 classifies the validation set perfectly.
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 2)) + 10.0 * y[:, None]
    assert select_l2(x[::2], y[::2], x[1::2], y[1::2], 2) == 0.1
