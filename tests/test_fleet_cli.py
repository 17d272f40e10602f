"""End to end: `edgefleet-server run` as a process, a real agent, and `edgefleet fleet ...`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from edgefleet.agent.helpformat import walk
from edgefleet.server.cli import build_parser
from edgefleet.server.cli.fleet import device_rows, parse_fields
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.netutil import free_port
from tests.agent_harness import reference_bundle

TOKEN = "operator-token"


def _fleet(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.server.cli", "fleet", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGEFLEET_API_TOKEN": TOKEN},
    )


def test_coordinator_agent_and_operator_cli(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> None:
    root = f"{topic_prefix}/edgefleet/v1"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "coordinator.log").open("wb")
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.server", "run",
         "--broker", f"{mqtt_broker.host}:{mqtt_broker.port}",
         "--root", root, "--store", f"sqlite:///{tmp_path / 'fleet.db'}",
         "--http", f"127.0.0.1:{port}", "--loss-grace", "5"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGEFLEET_API_TOKEN": TOKEN},
    )
    client = FleetClient(url, TOKEN)

    def answers() -> bool:
        try:
            return bool(client._call("GET", "/healthz")["status"] == "ok")
        except ApiError:
            return False

    # The coordinator's session must exist before the agent speaks, or its first events
    # (published before anyone subscribed) go nowhere, as MQTT intends.
    wait_until(answers, 60, "the coordinator's API")
    bundle, key = reference_bundle(tmp_path)
    cfg = write_config(tmp_path, device_id="pi-e2e", broker=mqtt_broker, topic_root=root,
                       bundle=bundle, key=key)
    agent = AgentProcess(cfg, tmp_path / "agent.log")

    def has_windows() -> bool:
        try:
            devs = client.devices()
        except ApiError:
            return False
        return bool(devs) and devs[0].online and devs[0].fps is not None

    try:
        wait_until(has_windows, 90, "the agent's telemetry in the coordinator")

        ls = _fleet(url, "ls")
        assert ls.returncode == 0, ls.stderr
        assert "pi-e2e" in ls.stdout and "mnist-cnn@1" in ls.stdout and "yes" in ls.stdout
        as_json = json.loads(_fleet(url, "ls", "--json").stdout)
        assert as_json[0]["device_id"] == "pi-e2e" and as_json[0]["fps"] > 0
        # The legend says what OP is, and what '~' means whenever a power figure carries it.
        assert "OP: operating point" in ls.stdout
        estimated = as_json[0]["power_source"] == "estimate" and as_json[0]["power_w"] is not None
        assert ("W~" in ls.stdout) == estimated
        assert ("~ after a power figure: estimated from CPU load" in ls.stdout) == estimated

        assign = _fleet(url, "assign", "pi-e2e", "lobby")
        assert assign.returncode == 0, assign.stderr
        assert _fleet(url, "groups", "--json").stdout.count("lobby") == 1
        reg = _fleet(url, "register", "cam-later", "--group", "lobby")
        assert reg.returncode == 0 and "cam-later: registered, group lobby" in reg.stdout
        later = {d["device_id"]: d for d in json.loads(_fleet(url, "ls", "--json").stdout)}
        assert later["cam-later"]["online"] is False and later["cam-later"]["group"] == "lobby"

        ping = _fleet(url, "cmd", "pi-e2e", "ping", "--json")
        assert ping.returncode == 0, ping.stderr + ping.stdout
        assert json.loads(ping.stdout)["replies"][0]["ok"] is True

        snap = _fleet(url, "cmd", "pi-e2e", "snapshot", "quality=70", "--out",
                      str(tmp_path / "frame.jpg"))
        assert snap.returncode == 0, snap.stderr + snap.stdout
        assert (tmp_path / "frame.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG

        bad = _fleet(url, "cmd", "pi-e2e", "set_operating_point", "index=99")
        assert bad.returncode == 1 and "error" in bad.stdout  # the agent refused it

        show = _fleet(url, "show", "pi-e2e")
        assert show.returncode == 0 and "missing 0, lost 0" in show.stdout, show.stdout
        assert "started" in show.stdout  # the agent's start event

        unknown = _fleet(url, "show", "nobody")
        assert unknown.returncode == 1 and "unknown device 'nobody'" in unknown.stderr

        metrics = client._call("GET", "/devices/pi-e2e/telemetry?limit=1")
        assert metrics[0]["telemetry"]["device_id"] == "pi-e2e"

        assert agent.terminate() == 0
        wait_until(
            lambda: not {d.device_id: d for d in client.devices()}["pi-e2e"].online,
            20,
            "the agent's offline status",
        )
    finally:
        if agent.alive():
            agent.kill()
        coordinator.terminate()
        rc = coordinator.wait(20)
        log.close()
    assert rc == 0, (tmp_path / "coordinator.log").read_text()[-3000:]


def test_cli_without_coordinator_says_so(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    r = _fleet(url, "ls")
    assert r.returncode == 1 and f"cannot reach the coordinator at {url}" in r.stderr
    after = subprocess.run(  # as a newcomer types it: the option after the action
        [sys.executable, "-m", "edgefleet.server.cli", "fleet", "ls", "--url", url],
        capture_output=True, text=True, timeout=60,
    )
    assert after.returncode == 1 and f"cannot reach the coordinator at {url}" in after.stderr


# The smallest valid arguments of every `fleet` action; the test below checks none is missing.
ACTION_ARGS = {
    "ls": [],
    "show": ["cam-01"],
    "groups": [],
    "register": ["cam-01"],
    "assign": ["cam-01", "lobby"],
    "cmd": ["cam-01", "ping"],
}


def _fleet_actions() -> set[str]:
    fleet = next(p for prog, p in walk(build_parser()) if prog == "edgefleet fleet")
    sub = next(a for a in fleet._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


# Actions on the broker's identity files, on the broker's host: no coordinator API involved.
BROKER_ACTIONS = {"provision", "revoke"}


def test_url_and_token_before_or_after_every_action() -> None:
    assert _fleet_actions() - BROKER_ACTIONS == set(ACTION_ARGS)
    parser = build_parser()
    for action, rest in ACTION_ARGS.items():
        conn = ["--url", "http://coord:1", "--token", "t0"]
        before = parser.parse_args(["fleet", *conn, action, *rest])
        after = parser.parse_args(["fleet", action, *rest, *conn])
        neither = parser.parse_args(["fleet", action, *rest])
        assert (before.url, before.token) == ("http://coord:1", "t0"), action
        assert (after.url, after.token) == ("http://coord:1", "t0"), action
        assert (neither.url, neither.token) == (None, None), action  # the env or default
        mixed = parser.parse_args(["fleet", "--url", "http://a:1", action, *rest,
                                   "--token", "t1"])
        assert (mixed.url, mixed.token) == ("http://a:1", "t1"), action


def test_field_parsing_and_table() -> None:
    assert parse_fields(["index=2", "pin=true", "thresholds=[0.9,null]", "x=abc"]) == {
        "index": 2, "pin": True, "thresholds": [0.9, None], "x": "abc",
    }
    assert device_rows([])[0][0] == "DEVICE"
