"""One stored update, judged: decoded deltas that join the aggregate, or a reason they do not.

The store kept the update as received (store/fed.py); here its tensors are decoded
(agent/federated: the same code the device encoded them with) and checked against what the
round announced (validate.check_update: the names and shapes of the base's head files,
finite values, the norm bound when one is fixed). A norm bound derived from the round itself
(robust_norm_bound) needs every accepted update, so it is applied when the round closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from edgefleet.agent.federated import decode_update
from edgefleet.agent.federated.wire import from_tensors
from edgefleet.agent.protocol import FedUpdate
from edgefleet.server.federated.validate import check_update, update_norm

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Judged:
    """The verdict on one update; delta and norm are set when it was decoded."""

    status: Literal["accepted", "rejected"]
    reason: str | None
    norm: float | None = None
    delta: dict[str, F32] | None = None


def parse(payload: str | None) -> FedUpdate | str:
    """The stored update, or why it cannot be read (a payload stored under an older protocol)."""
    if payload is None:
        return "no payload stored"
    try:
        return FedUpdate.model_validate_json(payload)
    except ValidationError as exc:
        return f"payload no longer validates: {exc.errors(include_url=False)[0]['msg']}"


def decode(update: FedUpdate) -> dict[str, F32] | str:
    """The update's float32 deltas by tensor name, or why they cannot be decoded."""
    try:
        return decode_update(from_tensors(update.tensors))
    except ValueError as exc:
        return f"undecodable tensors: {exc}"


def judge(
    update: FedUpdate,
    *,
    model_id: str,
    shapes: Mapping[str, tuple[int, ...]],
    max_norm: float | None,
) -> Judged:
    """Accept the update's deltas for aggregation, or reject them with a reason."""
    if update.model_id != model_id:
        return Judged("rejected", f"model {update.model_id!r}, the round's is {model_id!r}")
    delta = decode(update)
    if isinstance(delta, str):
        return Judged("rejected", delta)
    reason = check_update(delta, shapes, max_norm=max_norm)
    norm = update_norm(delta)
    if reason is not None:
        return Judged("rejected", reason, norm if np.isfinite(norm) else None)
    return Judged("accepted", None, norm, delta)
