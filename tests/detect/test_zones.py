"""Zones: an object is in a zone where it stands (its box's bottom-centre)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.zones import Zone, in_any_zone

# An L: the square (0, 0)-(100, 100) without its top-right quarter (50, 0)-(100, 50).
L_SHAPE = [[0, 0], [50, 0], [50, 50], [100, 50], [100, 100], [0, 100]]


def test_bottom_centre_decides_not_overlap() -> None:
    zone = Zone(name="driveway", points=[[0, 50], [100, 50], [100, 100], [0, 100]])
    assert zone.in_zone((40, 0, 60, 80))  # head above the zone, feet (50, 80) in it
    assert not zone.in_zone((40, 0, 60, 45))  # overlaps nothing, feet above
    assert not zone.in_zone((40, 60, 60, 120))  # box mostly inside, feet (50, 120) below
    assert not zone.in_zone((90, 60, 130, 90))  # feet (110, 90) right of it
    assert zone.in_zone((90, 60, 110, 100))  # feet (100, 100) on the corner: inside


def test_concave_polygon() -> None:
    zone = Zone(name="l", points=L_SHAPE)
    assert zone.in_zone((20, 0, 30, 30))
    assert not zone.in_zone((70, 0, 80, 30))  # in the notch
    assert zone.in_zone((70, 0, 80, 70))


def test_filter_keeps_order_and_any_zone_unites() -> None:
    dets = Detections.of(
        [(20, 0, 30, 30), (70, 0, 80, 30), (70, 0, 80, 70), (200, 0, 210, 10)],
        [0.9, 0.8, 0.7, 0.6],
        [0, 1, 2, 3],
    )
    zone = Zone(name="l", points=L_SHAPE)
    assert zone.filter(dets).classes.tolist() == [0, 2]
    far = Zone(name="far", points=[[190, 0], [220, 0], [220, 20]])
    assert in_any_zone(dets, [zone, far]).classes.tolist() == [0, 2, 3]
    assert in_any_zone(dets, []).classes.tolist() == [0, 1, 2, 3]
    assert len(zone.filter(Detections.empty())) == 0
    assert zone.mask(dets).dtype == np.bool_


def test_zone_from_config_round_trips() -> None:
    zone = Zone.model_validate_json('{"name": "gate", "points": [[0, 0], [10, 0], [5, 8]]}')
    assert Zone.model_validate_json(zone.model_dump_json()) == zone
    assert zone.in_zone((4, 0, 6, 4))


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"name": "z", "points": [[0, 0], [1, 1]]}, "at least 3"),
        ({"name": "z", "points": [[0, 0], [1, 1], [2, 2]]}, "no area"),
        ({"name": "z", "points": [[0, 0], [1, 0], [float("nan"), 1]]}, "finite"),
        ({"name": "z", "points": [[0, 0], [1, 0], [1, 1, 1]]}, "points"),
        ({"name": "", "points": [[0, 0], [1, 0], [1, 1]]}, "name"),
        ({"name": "z", "points": [[0, 0], [1, 0], [1, 1]], "objects": ["car"]}, "objects"),
    ],
)
def test_bad_zones_are_refused_with_the_reason(doc: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        Zone.model_validate(doc)
