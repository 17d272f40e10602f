"""Nothing in the catalogue fits: the loop asks the coordinator for a faster variant, once,
and the build runs as a catalogue job of origin 'loop'."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.fleet.simulate.variants import CLASS_SPEED, SimVariant
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.retune.client import LoopClient
from tests.retune.rig import FAST_LOOP, catalogue_on_fp32
from tests.rollout.fleet import (
    TOKEN,
    LocalFleet,
    local_fleet,
    start_coordinator_with,
)


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[LocalFleet]:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as f:
        yield f


def test_loop_builds_a_faster_variant_when_nothing_fits(fleet: LocalFleet) -> None:
    loop_cfg = FAST_LOOP.model_copy(update={"build": True})
    start_coordinator_with(fleet, loop=loop_cfg, signing_key=fleet.key.directory / "fleet.key")
    coord = fleet.coordinator
    assert coord is not None
    store = coord.store
    _catalogue, v1, _v1_dir = catalogue_on_fp32(fleet)
    LoopClient(coord.url, TOKEN).set_target("lab", {"p95_ms": 10.0})
    sim = Simulator(
        SimConfig(
            host=fleet.broker.host, port=fleet.broker.port, devices=2, rate=4.0,
            root=fleet.topic_root, group="lab", events_every=0,
            variants=(SimVariant(v1.manifest_sha256, "mnist-cnn", 1, (30.0,), 0),),
            initial_variant=v1.manifest_sha256, class_speed={c: 1.0 for c in CLASS_SPEED},
        )
    )
    sim.start()
    try:
        def built() -> bool:
            return any(d.action == "build" for d in store.decisions(group="lab"))

        wait_until(built, 60, "a build decision")
        (decision,) = [d for d in store.decisions(group="lab") if d.action == "build"]
        # The devices whose streak ended first; the other holds behind the same build.
        assert decision.devices and set(decision.devices) <= set(sim.device_ids())
        assert "no faster variant" in decision.message and decision.job_id
        job = store.job(decision.job_id)
        assert job is not None and job.origin == "loop" and job.model == "mnist"
        asked = json.loads(job.options_json)
        assert asked["prune"] == 0.25 and asked["exits"] == "auto", asked
        wait_until(
            lambda: (j := store.job(decision.job_id or "")) is not None
            and j.state in ("succeeded", "failed"),
            300,
            "the loop's build",
        )
        done = store.job(decision.job_id)
        assert done is not None and done.state == "succeeded", done
        new = store.variant(done.variant_id or "")
        assert new is not None and new.version == 2
        # One build per need: the devices still miss (they cannot install the new variant
        # here), but the loop does not build again while it has a new candidate.
        assert [d.action for d in store.decisions(group="lab")].count("build") == 1
    finally:
        sim.stop(graceful=False)
