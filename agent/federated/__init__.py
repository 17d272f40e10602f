"""Federated rounds on the device: the numerics, pure and transport-free.

A device fine-tunes its exit heads (never the backbone) on features of its own recent frames,
labelled by its final head when confident or by supplied labels (buffer), with softmax
regression and mini-batch SGD within a CPU-time budget (softmax), and sends only the weight
delta, optionally clipped and noised for update-level differential privacy (privacy) and
compressed (compress). Nothing here touches MQTT or the agent service.
"""

from .buffer import FeatureBuffer, Source, split
from .compress import (
    SCHEMES,
    EncodedArray,
    Scheme,
    decode,
    decode_update,
    encode,
    encode_update,
    raw_bytes,
    update_bytes,
)
from .privacy import add_gaussian_noise, clip_update, update_norm
from .softmax import HeadWeights, TrainResult, evaluate, loss_and_grad, train_head

__all__ = [
    "SCHEMES",
    "EncodedArray",
    "FeatureBuffer",
    "HeadWeights",
    "Scheme",
    "Source",
    "TrainResult",
    "add_gaussian_noise",
    "clip_update",
    "decode",
    "decode_update",
    "encode",
    "encode_update",
    "evaluate",
    "loss_and_grad",
    "raw_bytes",
    "split",
    "train_head",
    "update_bytes",
    "update_norm",
]
