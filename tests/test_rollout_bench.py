"""bench.rollout in a reduced mode: the report has its figures and they are sane (not fast)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.rollout import main


def test_rollout_bench_reports_every_figure(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "rollout.json"
    args = ["--devices", "4", "--agents", "1", "--size-mb", "1"]
    args += ["--solo-repeats", "1", "--out", str(out)]
    assert main(args, emit=lines.append) == 0
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text())
    assert report["rollout"]["counts"] == {"active": 4}, report["rollout"]
    assert report["activate_50_s"] > 0
    # Published once for the 4 devices: about a quarter of four copies, never four copies.
    assert 0.2 <= report["published_bytes_ratio"] < 0.3, report["published_bytes_ratio"]
    assert report["archive_bytes"] > 0.9e6
    # Heads only: a small part of the bundle, but not nothing (the heads and the manifest).
    assert 0 < report["delta_fraction"] < 0.2, report["delta"]
    assert report["delta"]["delta_files"] and all(
        f.startswith("heads/") for f in report["delta"]["delta_files"]
    )
    assert report["swap_gap_ms"] is not None and report["swap_gap_ms"] >= 0
    ratio = report["fps_during_transfer_ratio"]
    assert ratio is not None and 0 < ratio < 3, report["solo_transfers"]
    fleet_ratio = report["fps_during_fleet_rollout_ratio"]
    assert fleet_ratio is not None and 0 < fleet_ratio < 3, report["per_agent"]
    # The solo transfer's pad shares nothing with the version running: it travels.
    (solo,) = report["solo_transfers"]
    assert solo["chunks_received"] > 0 and solo["download_s"] > 0, solo
    agent = report["per_agent"]["agent-0"]
    assert agent["transfer"] == "full" and agent["chunks_received"] > 0, agent
