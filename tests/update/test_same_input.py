"""Which input shapes count as the same model input for an install."""

from __future__ import annotations

import pytest

from edgefleet.agent.update.manager import same_input


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ((1, 1, 64, 64), ("N", 1, 64, 64), True),  # the optimizer fixes the batch
        ((1, 3, 224, 224), (1, 3, 224, 224), True),
        ((1, 1, 64, 64), (1, 1, 32, 32), False),  # another image size
        ((1, 3, 64, 64), (1, 1, 64, 64), False),  # colour vs grey
        ((1, 64, 64), (1, 1, 64, 64), False),  # another rank
    ],
)
def test_same_input(a: tuple[int | str, ...], b: tuple[int | str, ...], same: bool) -> None:
    assert same_input(a, b) is same
    assert same_input(b, a) is same
