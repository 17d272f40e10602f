"""One device's side of a round on real digits: buffer -> split -> train -> clip/noise -> q8."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.federated import (
    FeatureBuffer,
    HeadWeights,
    add_gaussian_noise,
    clip_update,
    decode_update,
    encode_update,
    evaluate,
    raw_bytes,
    split,
    train_head,
    update_bytes,
)

from .digits import digits_split, pooled


def zeros(dim: int) -> HeadWeights:
    return HeadWeights(np.zeros((10, dim), np.float32), np.zeros(10, np.float32))


def sgd(base: HeadWeights, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> HeadWeights:
    return train_head(
        base, x, y, epochs=epochs, lr=0.5, batch_size=32, weight_decay=1e-4, prox_mu=0.0,
        rng=np.random.default_rng(seed),
    ).head


def test_self_distillation_round_improves_the_early_exit() -> None:
    x_tr, x_te, y_tr, y_te = digits_split()
    early_tr, early_te = pooled(x_tr), pooled(x_te)
    # The final head sees all 64 pixels; the early exit only 16 pooled features and was
    # fitted where digits 5-9 never appeared (another scene's class mix).
    final = sgd(zeros(64), x_tr, y_tr, epochs=20, seed=0)
    skew = y_tr < 5
    base = sgd(zeros(16), early_tr[skew], y_tr[skew], epochs=20, seed=0)

    # The device's frames, labelled by its own final head (no true labels used from here).
    logits = x_tr @ final.weight.T + final.bias
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    buf = FeatureBuffer(2000)
    for i in range(len(y_tr)):
        buf.add([early_tr[i], x_tr[i]], int(probs[i].argmax()), float(probs[i].max()), "pseudo")
    x, y = buf.examples(0, min_confidence=0.9)
    assert 0.5 * len(y_tr) < len(y) < len(y_tr)
    x_fit, y_fit, x_val, y_val = split(x, y, 0.2, np.random.default_rng(0))

    result = train_head(
        base, x_fit, y_fit, epochs=10, lr=0.5, batch_size=32, weight_decay=1e-4,
        prox_mu=0.001, rng=np.random.default_rng(1),
    )
    _, val_before = evaluate(base, x_val, y_val)
    _, val_after = evaluate(result.head, x_val, y_val)
    _, test_before = evaluate(base, early_te, y_te)
    _, test_after = evaluate(result.head, early_te, y_te)
    assert val_after > val_before + 0.25  # what the device reports
    assert test_before < 0.5 and test_after > test_before + 0.25  # true labels, held out

    # The update as sent: clipped, noised, 8-bit; the coordinator applies it to the base.
    # A multiplier of 0.01 is far from a useful privacy level (that needs ~1 and many devices
    # averaged); here it only shows that the pipeline keeps what was learnt.
    clip, multiplier = 12.0, 0.01
    clipped, norm = clip_update(result.head.delta(base), clip)
    assert 0 < norm <= clip  # so the noise, not the clip, is all that changes it
    noised = add_gaussian_noise(clipped, clip=clip, noise_multiplier=multiplier,
                                rng=np.random.default_rng(2))
    encoded = encode_update(noised, "q8", np.random.default_rng(3))
    assert update_bytes(encoded) == raw_bytes(noised) // 4 + 2 * 8  # + scale, offset each
    _, received = evaluate(base.apply(decode_update(encoded)), early_te, y_te)
    assert received == pytest.approx(test_after, abs=0.03)
