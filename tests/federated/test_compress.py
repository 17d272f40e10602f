"""Update compression: exactness, unbiased stochastic rounding, error bounds, byte counts."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.federated import (
    SCHEMES,
    EncodedArray,
    HeadWeights,
    decode,
    decode_update,
    encode,
    encode_update,
    evaluate,
    raw_bytes,
    train_head,
    update_bytes,
)

from .digits import Split, digits_split


@pytest.fixture(scope="module")
def digits() -> Split:
    return digits_split()


@pytest.fixture(scope="module")
def trained(digits: Split) -> tuple[HeadWeights, HeadWeights]:
    """(base, new): a head fitted on digits 0-4, then fine-tuned on all digits."""
    x_tr, _, y_tr, _ = digits
    zero = HeadWeights(np.zeros((10, 64), np.float32), np.zeros(10, np.float32))
    kw = {"lr": 0.5, "batch_size": 32, "weight_decay": 1e-4, "prox_mu": 0.0}
    skew = y_tr < 5
    base = train_head(zero, x_tr[skew], y_tr[skew], epochs=10, rng=np.random.default_rng(0),
                      **kw).head  # type: ignore[arg-type]
    new = train_head(base, x_tr, y_tr, epochs=3, rng=np.random.default_rng(1),
                     **kw).head  # type: ignore[arg-type]
    return base, new


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (10,), (10, 64), (2, 3, 4)])
def test_round_trip_keeps_shape_and_dtype(scheme: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)  # shape test: random values are fine
    out = decode(encode(x, scheme, rng))  # type: ignore[arg-type]
    assert out.shape == shape and out.dtype == np.float32


def test_fp32_is_exact_and_fp16_is_close(trained: tuple[HeadWeights, HeadWeights]) -> None:
    base, new = trained
    w = new.delta(base)["weight"]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(decode(encode(w, "fp32", rng)), w)
    np.testing.assert_allclose(decode(encode(w, "fp16", rng)), w, rtol=1e-3, atol=1e-7)


def test_q8_stochastic_rounding_is_unbiased(trained: tuple[HeadWeights, HeadWeights]) -> None:
    base, new = trained
    x = new.delta(base)["weight"][:4].ravel()  # 256 real coordinates
    rng = np.random.default_rng(1)
    first = encode(x, "q8", rng)
    step = first.scale
    runs = 4000
    mean = np.zeros(x.shape)
    for _ in range(runs):
        mean += decode(encode(x, "q8", rng))
    mean /= runs
    # Each decode is off by at most one step, so the mean's std is <= step / (2 sqrt(runs))
    # ~ 0.008 step; 0.05 step is > 6 of those, and well below round-to-nearest's bias (up to
    # half a step: checked to exceed the bound on this data).
    assert np.abs(mean - x).max() < 0.05 * step
    nearest = first.offset + step * np.round((x - first.offset) / step)
    assert np.abs(nearest - x).max() > 0.3 * step


def test_q8_error_is_below_one_step(trained: tuple[HeadWeights, HeadWeights]) -> None:
    base, new = trained
    rng = np.random.default_rng(2)
    for value in new.delta(base).values():
        enc = encode(value, "q8", rng)
        assert enc.scale == pytest.approx((value.max() - value.min()) / 255)
        assert enc.offset == value.min()
        assert np.abs(decode(enc) - value).max() < enc.scale * (1 + 1e-6)


@pytest.mark.parametrize("constant", [0.0, -0.25, 3.0])
def test_q8_constant_tensor_is_exact(constant: float) -> None:
    x = np.full((10, 64), constant, np.float32)
    enc = encode(x, "q8", np.random.default_rng(0))
    assert enc.scale == 0.0
    np.testing.assert_array_equal(decode(enc), x)


def test_byte_counts(trained: tuple[HeadWeights, HeadWeights]) -> None:
    base, new = trained
    delta = new.delta(base)
    rng = np.random.default_rng(3)
    raw = raw_bytes(delta)
    assert raw == 4 * (10 * 64 + 10)
    assert update_bytes(encode_update(delta, "fp32", rng)) == raw
    assert update_bytes(encode_update(delta, "fp16", rng)) * 2 == raw
    q8 = update_bytes(encode_update(delta, "q8", rng))
    assert q8 == 10 * 64 + 10 + 2 * 8  # one byte a value, scale + offset per tensor
    assert 0.25 <= q8 / raw < 0.26


def test_a_compressed_update_keeps_the_heads_accuracy(
    digits: Split, trained: tuple[HeadWeights, HeadWeights]
) -> None:
    _, x_te, _, y_te = digits
    base, new = trained
    _, exact = evaluate(new, x_te, y_te)
    for scheme in SCHEMES:
        encoded = encode_update(new.delta(base), scheme, np.random.default_rng(4))
        decoded = decode_update(encoded)
        assert set(decoded) == {"weight", "bias"}
        _, acc = evaluate(base.apply(decoded), x_te, y_te)
        assert acc == pytest.approx(exact, abs=0.01), scheme


def test_bad_input_is_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([1.0, np.nan]), "q8", rng)
    with pytest.raises(ValueError, match="fp16"):
        encode(np.array([1e6]), "fp16", rng)
    with pytest.raises(ValueError, match="unknown"):
        encode(np.zeros(3), "int4", rng)  # type: ignore[arg-type]
    good = encode(np.zeros(4), "fp16", rng)
    with pytest.raises(ValueError, match="does not fit"):
        decode(EncodedArray("fp16", (4,), good.data[:-2], 0.0, 0.0))
    with pytest.raises(ValueError, match="scale"):
        decode(EncodedArray("q8", (1,), b"\x01", float("nan"), 0.0))
