"""Applying an operator's target change to what is stored (pure but for the store calls)."""

from __future__ import annotations

import time

from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.store.catalogue_base import GroupTarget
from edgefleet.server.retune.views import TargetChange


class TargetError(ValueError):
    """The change cannot apply; the message says why."""


def apply_change(store: Store, group: str, change: TargetChange) -> GroupTarget:
    """Merge change into the group's target and store it; TargetError naming what is wrong."""
    old = store.target(group)
    p95 = change.p95_ms if change.p95_ms is not None else old.p95_ms if old else None
    if p95 is None:
        raise TargetError(f"group {group!r} has no target yet: give p95_ms")
    if change.pin_variant is not None and change.unpin_variant:
        raise TargetError("pin_variant and unpin_variant together")
    pinned = old.pinned_variant if old else None
    if change.pin_variant is not None:
        if store.variant(change.pin_variant) is None:
            raise TargetError(f"no variant {change.pin_variant!r} in the catalogue")
        pinned = change.pin_variant
    if change.unpin_variant:
        pinned = None
    accuracy = old.min_accuracy if old else None
    if change.min_accuracy is not None:
        accuracy = change.min_accuracy
    if change.clear_accuracy:
        accuracy = None
    power = old.max_power_w if old else None
    if change.max_power_w is not None:
        power = change.max_power_w
    if change.clear_power:
        power = None
    loop = change.loop if change.loop is not None else old.loop if old else True
    target = GroupTarget(group, p95, accuracy, power, loop, pinned, time.time())
    store.set_target(target)
    return target
