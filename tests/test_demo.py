"""The README's main job runs end to end (fewer video frames, same path), and fails loudly.

The second test kills one of the demo's real agents while it runs, as a crash on a device
would, and expects the demo's own checks to notice it and exit non-zero.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil

from edgefleet.agent.protocol import Telemetry
from edgefleet.server.demo.federated import EXIT_RATE_TOLERANCE, split_windows
from edgefleet.server.local.waiting import wait_until
from tests.protocol_samples import telemetry

DEMO = [sys.executable, "-m", "edgefleet.server.cli", "demo", "--frames", "60"]
# A log record as logging's default CLI format prints it: none may reach the console.
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", re.MULTILINE)


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run([*DEMO, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["split_sizes"] == {
        "train": 3000,
        "calibration": 500,
        "validation": 500,
        "test": 1000,
    }
    assert report["bundles"]["fp32"]["accuracy"] >= 0.97
    assert (
        report["bundles"]["int8+exits"]["accuracy"] >= report["bundles"]["fp32"]["accuracy"] - 0.015
    )
    assert report["video"]["frames"] == 60
    device = report["device"]
    assert device["agent_exit_codes"] == [0, 0]
    assert device["devices"] == 51 and device["online_at_view"] == 51
    assert device["agents_reporting"] == 2 and device["ping_ok"] is True
    assert device["telemetry_windows"] > 50 and device["missing"] == 0
    assert device["rejected"] == 0 and device["events"] >= 2
    assert device["agents_offline_after_stop"] == ["demo-pi-1", "demo-pi-2"]
    # The INT8 bundle reached both agents through a canary; the bad one was halted and the
    # canary rolled back, the other agent never downloaded it.
    assert device["rollout"]["state"] == "completed"
    assert device["rollout"]["counts"] == {"active": 2}
    bad = device["bad_rollout"]
    assert bad["state"] == "halted" and "exit_rate" in bad["reason"]
    assert sorted(d["state"] for d in bad["devices"]) == ["pending", "rolled_back"]
    # Then one federated round on the agents' own frames: both sent an update, the new heads
    # went out as v3 through a canary, as a delta, and exit no fewer frames early.
    fed = device["federated"]
    assert fed["round"]["state"] == "done" and fed["round"]["result_version"] == 3
    assert sorted(fed["updates"]) == ["demo-pi-1", "demo-pi-2"]
    for u in fed["updates"].values():
        assert 0 < u["encoded_bytes"] < u["raw_bytes"] / 3  # q8: a byte per float32
    assert fed["round"]["figures"]["holdout"]["samples"] == 600
    assert fed["fed_rollout"]["state"] == "completed"
    assert fed["fed_rollout"]["counts"] == {"active": 2}
    assert fed["transfers"] == {"demo-pi-1": "delta", "demo-pi-2": "delta"}
    assert fed["delta_bytes"] < fed["full_bytes"] / 5
    assert fed["windows_before"] >= 2 and fed["windows_after"] >= 6
    assert fed["exit_rate_after"] >= fed["exit_rate_before"] - EXIT_RATE_TOLERANCE
    assert (out / "bundles" / "mnist-cnn-int8-exits" / "report.png").exists()
    # The detector: INT8 within its budget, one agent on the detection video whose object
    # events match the video's truth, stopped cleanly (server/demo/detector.py).
    assert report["detector"]["budget"]["within"] is True
    det = device["detector"]
    assert det["exit_code"] == 0 and det["object_starts"] >= 1 and det["object_ends"] >= 1
    assert det["judged"] >= 8 and not det["missed"] and det["windows_with_counts"] >= 1

    # Every check passed, and the console says so last.
    checks = report["checks"]
    assert report["passed"] is True and len(checks) >= 10
    assert all(c["ok"] for c in checks), checks
    lines = res.stdout.splitlines()
    assert lines[-1] == f"All {len(checks)} checks passed."
    for c in checks:
        assert any(line.startswith(f"  pass  {c['name']}") for line in lines), c["name"]
    # The story: seven numbered steps, the fleet view with its legend, the ping's reply.
    for n in range(1, 8):
        assert any(line.startswith(f"{n}. ") for line in lines), n
    assert "$ edgefleet fleet ls" in res.stdout and "demo-pi-1" in res.stdout
    assert "$ edgefleet fleet show demo-det-1" in res.stdout and "objects:" in res.stdout
    assert "$ edgefleet deploy mnist-cnn-int8-exits --group demo --canary 1" in res.stdout
    assert "(wave 0): rolled_back" in res.stdout
    assert "$ edgefleet fl start --group demo" in res.stdout
    assert "v3 after the round:" in res.stdout
    assert "estimated from CPU load" in res.stdout
    ping = lines.index("   $ edgefleet fleet cmd demo-pi-1 ping")
    assert lines[ping + 1].strip().startswith("demo-pi-1: ok")
    # Library logs go to the log file, none to the console.
    assert not LOG_RECORD.search(res.stdout) and not LOG_RECORD.search(res.stderr), res.stderr
    log = (out / "demo.log").read_text()
    assert "edgefleet.server.fleet" in log and "optimizer:" in log


def test_round_windows_split_by_version_and_install() -> None:
    """Before: base-version windows from the round's start to the install; after: the new
    version's windows once installed. A window across the install, an earlier bad bundle
    with the same version number and windows before the round count for neither."""
    t0, installed = 1_000.0, 1_020.0

    def window(start: float, version: int, model: str = "mnist-cnn") -> Telemetry:
        return telemetry(seq=int(start)).model_copy(
            update={
                "window_start": start,
                "window_end": start + 2,
                "model_version": version,
                "model_id": model,
            }
        )

    windows = [
        window(990, 2),  # before the round
        window(994, 3),  # the halted bad bundle, also v3
        window(1000, 2),
        window(1010, 2),
        window(1019, 2),  # the install happened during it
        window(1020, 3),
        window(1024, 3, model="other"),
        window(1030, 3),
    ]
    before, after = split_windows(windows, "mnist-cnn", 2, 3, t0, installed)
    assert [w.window_start for w in before] == [1000, 1010]
    assert [w.window_start for w in after] == [1020, 1030]


def _agent_process(demo: psutil.Process, config: Path) -> psutil.Process | None:
    """The demo's agent process started with this config, if it runs now."""
    for child in demo.children(recursive=True):
        try:
            if str(config) in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_demo_fails_when_an_agent_dies(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    config = out / "device" / "demo-pi-1" / "agent.toml"
    demo = subprocess.Popen(
        [*DEMO, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        parent = psutil.Process(demo.pid)
        found: list[psutil.Process] = []

        def started() -> bool:
            found[:] = [p for p in [_agent_process(parent, config)] if p is not None]
            return bool(found) or demo.poll() is not None

        wait_until(started, 500, "the demo to start demo-pi-1", poll=0.05)
        assert found, f"the demo ended without starting demo-pi-1: {demo.returncode}"
        found[0].kill()  # a crash: no clean shutdown, no goodbye
        stdout, stderr = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
    assert demo.returncode == 1, stdout[-3000:] + stderr[-3000:]
    lines = stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAILED: ")]
    # The first check to see the crash names the device; which one that is depends only on
    # when the kill landed (normally while the demo waits for the agents' first reports).
    assert failed and lines[-len(failed) :] == failed, stdout[-3000:]
    assert any("demo-pi-1" in line for line in failed), failed
    assert any(line.startswith("  FAIL  ") for line in lines)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False
    assert any(not c["ok"] for c in report["checks"])
