"""The simulator at scale and from the command line: one loop thread, processes, loss bursts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgefleet.server.fleet.simulate import SimConfig, Simulator, run_simulation
from edgefleet.server.local.broker import MosquittoBroker
from tests.simulate.helpers import (
    start,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def test_cli_prints_json(mqtt_broker: MosquittoBroker, topic_prefix: str) -> None:
    exe = REPO / ".venv" / "bin" / "edgefleet"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgefleet.server.cli"]
    proc = subprocess.run(
        [
            *cmd,
            "simulate",
            "--devices",
            "5",
            "--rate",
            "2",
            "--duration",
            "2",
            "--host",
            mqtt_broker.host,
            "--port",
            str(mqtt_broker.port),
            "--root",
            topic_prefix,
            "--progress-every",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["devices"] == 5 and report["produced"] > 0
    assert report["acked"] == report["produced"] and report["drained"] is True
    assert "produced" in proc.stderr  # progress lines


def test_300_devices_one_loop_thread(
    mqtt_broker: MosquittoBroker, topic_prefix: str, sims: list[Simulator]
) -> None:
    threads_before = threading.active_count()
    cfg = SimConfig(mqtt_broker.host, mqtt_broker.port, devices=300, rate=1, root=topic_prefix)
    sim = start(sims, cfg)
    assert threading.active_count() == threads_before + 1  # one loop thread for 300 clients
    assert sim.stats().online == 300
    wait_for("600 windows", lambda: sim.stats().produced >= 600, timeout=15)
    sim.pause()
    assert sim.wait_drained(10)
    stats = sim.stats()
    assert stats.produced >= 600 and stats.acked == stats.produced
    sim.stop()
    assert sim.stats().online == 0


def test_run_simulation_processes_and_loss_burst(
    mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    cfg = SimConfig(mqtt_broker.host, mqtt_broker.port, devices=20, rate=5, root=topic_prefix)
    report = run_simulation(cfg, 6.0, procs=2, loss_burst=True)
    assert report.procs == 2 and report.devices == 20
    assert report.offline_bursts >= 2 and report.taken_offline >= 2  # one per process at 5 s
    assert report.reconnects >= report.taken_offline
    assert report.drained and report.backlog == 0
    assert report.acked == report.produced - report.overflow
    assert report.publish_rate > 50
