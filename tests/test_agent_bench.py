"""`edgefleet-agent bench`: every operating point measured on real video frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgefleet.agent.benchmark import bench_bundle, read_frames, report, turn_order
from edgefleet.agent.bundle import (
    generate_private_key,
    load_public_key,
    save_public_key,
    verify_bundle,
    write_bundle,
)
from edgefleet.server.reference import VIDEO_PATH
from tests.bundle_helpers import two_stage_body, two_stage_files


def _bundle(tmp_path: Path) -> tuple[Path, Path]:
    key = generate_private_key()
    write_bundle(tmp_path / "b", two_stage_body(), two_stage_files(), key)
    save_public_key(key.public_key(), tmp_path / "fleet.pub")
    return tmp_path / "b", tmp_path / "fleet.pub"


def test_every_operating_point_and_exits_off(tmp_path: Path) -> None:
    bundle, pub = _bundle(tmp_path)
    verified = verify_bundle(bundle, [load_public_key(pub)])
    frames = read_frames(str(VIDEO_PATH), 30)
    results = bench_bundle(verified, frames, rounds=3)
    assert [r.name for r in results] == ["accurate", "fast", "exits off"]
    for r in results:
        # Each frame counted once, however many rounds timed it (rounds used to multiply it).
        assert r.frames == 30 and r.rounds == 3
        assert sum(r.exit_histogram) == r.frames, (r.name, r.exit_histogram)
        assert r.mean_ms > 0 and r.median_ms > 0 and r.fps > 0
    assert results[-1].exit_histogram == [0, 30]
    assert results[-1].power_source in ("rapl", "hwmon", "ina3221", "pmic", "estimate")
    text = report(results)
    assert "MEAN ms" in text and "of the 30 frames" in text and "3 round(s)" in text


def test_turns_rotate_so_no_point_is_always_timed_first() -> None:
    orders = [turn_order(4, shift) for shift in range(4)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    for position in range(4):
        assert sorted(o[position] for o in orders) == [0, 1, 2, 3]


def test_cli_text_json_and_bad_source(tmp_path: Path) -> None:
    bundle, pub = _bundle(tmp_path)
    base = [sys.executable, "-m", "edgefleet.agent", "bench", str(bundle), "--key", str(pub)]
    run = [*base, "--source", str(VIDEO_PATH), "--frames", "12", "--rounds", "2"]
    text = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "12 frames of" in text.stdout and "x 2 round(s)" in text.stdout
    rows = [ln.split() for ln in text.stdout.splitlines()
            if ln.split()[:1] in (["accurate"], ["fast"], ["exits"])]
    assert len(rows) == 3
    for row in rows:  # the EXITS column: frames per exit, which the header's count must match
        exits = next(c for c in row if "/" in c)
        assert sum(int(n) for n in exits.split("/")) == 12, row
    ok = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    points = json.loads(ok.stdout)
    assert len(points) == 3
    assert all(sum(p["exit_histogram"]) == p["frames"] == 12 for p in points)
    bad = subprocess.run(
        [*base, "--source", str(tmp_path / "nope.avi")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "nope.avi: OpenCV cannot open it" in bad.stderr
