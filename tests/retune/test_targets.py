"""Group targets through the HTTP API and the CLI of a real coordinator, and /metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.cli.app import main
from edgefleet.server.fleet.client import ApiError
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.retune.client import LoopClient
from tests.retune.rig import FAST_LOOP, add_variant
from tests.rollout.fleet import TOKEN, LocalFleet, local_fleet, start_coordinator_with


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[LocalFleet]:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as f:
        start_coordinator_with(f, loop=FAST_LOOP)
        yield f


def test_set_merges_fields_and_validates(fleet: LocalFleet) -> None:
    assert fleet.coordinator is not None
    client = LoopClient(fleet.coordinator.url, TOKEN)
    with pytest.raises(ApiError, match=r"HTTP 400.*give p95_ms"):
        client.set_target("lobby", {"min_accuracy": 0.9})
    t = client.set_target("lobby", {"p95_ms": 25, "min_accuracy": 0.97, "max_power_w": 6})
    assert (t.p95_ms, t.min_accuracy, t.max_power_w, t.loop) == (25, 0.97, 6, True)
    t = client.set_target("lobby", {"loop": False, "clear_power": True})
    assert (t.p95_ms, t.min_accuracy, t.max_power_w, t.loop) == (25, 0.97, None, False)
    with pytest.raises(ApiError, match=r"HTTP 400.*no variant 'nope-v1'"):
        client.set_target("lobby", {"pin_variant": "nope-v1"})
    add_variant(fleet, 1, [("accurate", 0.99, 1.0)], no_exit_ms=1.0, sim_ms=None)
    assert client.set_target("lobby", {"pin_variant": "mnist-v1"}).pinned_variant == "mnist-v1"
    assert client.set_target("lobby", {"unpin_variant": True}).pinned_variant is None
    with pytest.raises(ApiError, match=r"HTTP 422.*p95_ms"):
        client.set_target("lobby", {"p95_ms": -1})
    with pytest.raises(ApiError, match=r"HTTP 422.*p95: Extra inputs"):
        client.set_target("lobby", {"p95": 3})
    with pytest.raises(ApiError, match=r"HTTP 401"):
        LoopClient(fleet.coordinator.url, "wrong").set_target("lobby", {"p95_ms": 3})
    view = client.group_loop("lobby")
    assert view.target is not None and view.target.p95_ms == 25 and view.decisions == []
    assert [v.group for v in client.loops()] == ["lobby"]


def test_cli_group_set_show_ls_and_metrics(
    fleet: LocalFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet.coordinator is not None
    conn = ["--url", fleet.coordinator.url, "--token", TOKEN]
    assert main(["group", "set", "lobby", "--p95-ms", "40", "--min-accuracy", "0.95", *conn]) == 0
    assert "group lobby: p95 <= 40 ms, accuracy >= 0.95, loop on" in capsys.readouterr().out
    assert main(["group", "set", "lobby", "--loop", "off", *conn]) == 0
    assert main(["group", "show", "lobby", *conn]) == 0
    out = capsys.readouterr().out
    assert "loop off" in out and "0 device(s) online" in out
    assert main(["group", "ls", *conn]) == 0
    assert "lobby" in capsys.readouterr().out
    assert main(["group", "set", "lobby", *conn]) == 1
    assert "nothing to set" in capsys.readouterr().err
    fleet.coordinator.store.add_decision("lobby", 1.0, "hold", ["d1"], "d1: waiting", "{}")
    with urllib.request.urlopen(fleet.coordinator.url + "/metrics") as resp:
        metrics = resp.read().decode()
    assert 'edgefleet_group_target_p95_ms{group="lobby"} 40.0' in metrics
    assert 'edgefleet_group_loop_enabled{group="lobby"} 0.0' in metrics
    assert 'edgefleet_loop_decisions_total{action="hold"} 1.0' in metrics
