"""The closed loop retunes a real agent: catalogue model, its running bundle imported, a build
of the coordinator, and a rollout the loop decides by itself.

The agent (a real `edgefleet-agent run` process on the reference video) starts on the fp32
reference bundle. Its target is then set from its own calibrated latency (0.7 x its fp32 p95),
so the test holds on any machine: the agent is too slow for its target on fp32, and the INT8
variant the coordinator built meets it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.retune.client import LoopClient
from edgefleet.server.retune.config import LoopConfig
from edgefleet.server.retune.engine import CALIBRATION_WINDOWS
from tests.retune.rig import FAST_LOOP, catalogue_on_fp32
from tests.rollout.fleet import (
    TOKEN,
    LocalFleet,
    local_fleet,
    start_coordinator_with,
)

LOOP = LoopConfig.model_validate({**FAST_LOOP.model_dump(), "soak_s": 3.0, "tick_s": 0.5})


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[LocalFleet]:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as f:
        yield f


def test_loop_retunes_a_real_agent_that_misses_its_target(fleet: LocalFleet) -> None:
    start_coordinator_with(fleet, loop=LOOP, signing_key=fleet.key.directory / "fleet.key")
    coord = fleet.coordinator
    assert coord is not None
    store = coord.store
    loop = LoopClient(coord.url, TOKEN)
    # The bundle the fleet runs today joins the catalogue as a variant (fp32, no exits).
    catalogue, fp32, v1_dir = catalogue_on_fp32(fleet)
    job = catalogue.build("mnist", {})  # INT8 with early exits, the optimizer's defaults
    fleet.start_agent("cam-1", v1_dir, group="lab")
    fleet.wait_online(loop, 1)
    loop.set_target("lab", {"p95_ms": 10_000.0})

    def fp32_p95() -> float | None:
        dev = store.device("cam-1")
        cls = dev.status.hardware.device_class if dev and dev.status else None
        for r in store.latencies(fp32.manifest_sha256):
            if r.device_class == cls and r.windows >= CALIBRATION_WINDOWS:
                return r.p95_ms
        return None

    wait_until(lambda: fp32_p95() is not None, 120, "the agent's fp32 calibration",
               detail=fleet.logs)
    wait_until(
        lambda: catalogue.job(job.job_id).state in ("succeeded", "failed"), 300, "the build"
    )
    built = catalogue.job(job.job_id)
    assert built.state == "succeeded", built.reason
    int8 = store.variant(built.variant_id or "")
    assert int8 is not None and int8.version == 2
    target = 0.7 * (fp32_p95() or 0.0)
    loop.set_target("lab", {"p95_ms": target})

    def retuned() -> bool:
        dev = store.device("cam-1")
        recent = [r.telemetry for r in store.telemetry("cam-1", limit=3)]
        return (
            dev is not None
            and dev.status is not None
            and dev.status.bundle_sha256 == int8.manifest_sha256
            and len(recent) == 3
            and all(t.model_version == 2 and t.latency_ms.p95 <= target for t in recent)
        )

    def why() -> str:
        lines = [f"{d.action}: {d.message}" for d in store.decisions(group="lab")]
        return "\n".join([f"target {target:.3f} ms", *lines, fleet.logs()])

    wait_until(retuned, 240, "the agent on the INT8 variant, under its target", detail=why)
    rolls = [d for d in store.decisions(group="lab") if d.action == "rollout"]
    assert rolls and all(d.devices == ("cam-1",) for d in rolls)
    assert any(f"over {target:g} ms" in d.message for d in rolls)
    last = rolls[0]
    r = store.rollout(last.rollout_id or "")
    assert r is not None and r.manifest_sha256 == int8.manifest_sha256
    assert r.state in ("running", "completed")
