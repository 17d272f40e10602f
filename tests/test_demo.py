"""The README's main job runs end to end (fewer video frames, same path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "edgefleet.server.cli", "demo", "--out", str(out), "--frames", "60"],
        capture_output=True,
        text=True,
        timeout=600,
    )
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
    assert device["devices"] == 50 and device["online_at_view"] == 50
    assert device["agents_reporting"] == 2 and device["ping_ok"] is True
    assert device["telemetry_windows"] > 50 and device["missing"] == 0
    assert device["rejected"] == 0 and device["events"] >= 2
    assert device["agents_offline_after_stop"] == ["demo-pi-1", "demo-pi-2"]
    assert (out / "bundles" / "mnist-cnn-int8-exits" / "report.png").exists()
    assert "edgefleet fleet ls" in res.stdout and "demo-pi-1" in res.stdout
