"""Federated messages on the wire: tensors, their checks, and who takes part."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from edgefleet.agent.federated import HeadWeights, decode_update, encode_update
from edgefleet.agent.federated.wire import flatten_heads, from_tensors, split_heads, to_tensors
from edgefleet.agent.protocol import (
    EncodedTensor,
    FedUpdate,
    ProtocolError,
    TopicTree,
    decode,
    decode_topic,
    encode,
    sampled,
)
from tests.protocol_samples import fed_update


@pytest.mark.parametrize("scheme", ["fp32", "fp16", "q8"])
def test_an_update_survives_the_wire(scheme: str) -> None:
    rng = np.random.default_rng(0)
    base = HeadWeights(np.zeros((10, 64), np.float32), np.zeros(10, np.float32))
    new = HeadWeights(
        rng.normal(0, 0.05, (10, 64)).astype(np.float32),
        rng.normal(0, 0.01, 10).astype(np.float32),
    )
    delta = flatten_heads({0: new.delta(base)})
    assert sorted(delta) == ["exit0.bias", "exit0.weight"]
    encoded = encode_update(delta, scheme, rng)  # type: ignore[arg-type]
    msg = fed_update().model_copy(update={"tensors": to_tensors(encoded)})
    back = decode(FedUpdate, encode(msg))
    assert isinstance(back, FedUpdate)
    got = split_heads(decode_update(from_tensors(back.tensors)))
    for part in ("weight", "bias"):
        want = delta[f"exit0.{part}"]
        # fp16: 11 significant bits; q8: under one step of the tensor's range / 255.
        step = {"fp32": 0.0, "fp16": 1e-3, "q8": float(np.ptp(want)) / 255}[scheme]
        assert got[0][part].shape == want.shape
        assert np.max(np.abs(got[0][part] - want)) <= step + 1e-7


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused() -> None:
    data = base64.b64encode(np.zeros(5, "<f2").tobytes()).decode()
    with pytest.raises(ValueError, match=r"exit0\.bias: 10 bytes for shape \[3\] in fp16"):
        EncodedTensor(name="exit0.bias", shape=[3], scheme="fp16", data=data)
    with pytest.raises(ValueError, match="not base64"):
        EncodedTensor(name="exit0.bias", shape=[3], scheme="q8", data="!!!!")
    with pytest.raises(ValueError, match="name"):
        EncodedTensor(name="stage0.weight", shape=[3], scheme="q8", data="AAAA")


def test_repeated_tensor_names_and_a_foreign_round_are_refused() -> None:
    msg = fed_update()
    twice = msg.model_dump(mode="json")
    twice["tensors"] = [twice["tensors"][0], twice["tensors"][0]]
    err = decode(FedUpdate, json.dumps(twice).encode())
    assert isinstance(err, ProtocolError) and "repeat" in err.message
    tree = TopicTree()
    err = decode_topic(tree, tree.fed_update("r-13", "pi-7"), encode(msg))
    assert isinstance(err, ProtocolError) and "round_id" in err.message


def test_split_heads_names_a_foreign_tensor() -> None:
    with pytest.raises(ValueError, match=r"'exitA\.weight'"):
        split_heads({"exitA.weight": np.zeros(1)})


def test_sampling_is_a_stable_share_of_the_fleet() -> None:
    devices = [f"cam-{i:04d}" for i in range(4000)]
    chosen = [d for d in devices if sampled("r-7", d, 0.25)]
    # Binomial(4000, 0.25): sd 27; the same answer every time it is asked.
    assert abs(len(chosen) - 1000) < 150
    assert chosen == [d for d in devices if sampled("r-7", d, 0.25)]
    # Another round draws another set; everyone takes part at 1.0.
    assert chosen != [d for d in devices if sampled("r-8", d, 0.25)]
    assert all(sampled("r-7", d, 1.0) for d in devices[:10])
