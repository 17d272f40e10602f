"""`edgefleet-agent bench`: every operating point measured on real video frames."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgefleet.agent.benchmark import bench_bundle, read_frames
from edgefleet.agent.bundle import (
    generate_private_key,
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
    from edgefleet.agent.bundle import load_public_key

    verified = verify_bundle(bundle, [load_public_key(pub)])
    frames = read_frames(str(VIDEO_PATH), 30)
    results = bench_bundle(verified, frames, rounds=1)
    assert [r.name for r in results] == ["accurate", "fast", "exits off"]
    for r in results:
        assert sum(r.exit_histogram) == 30 and r.median_ms > 0 and r.fps > 0
    assert results[-1].exit_histogram == [0, 30]
    assert results[-1].power_source in ("rapl", "hwmon", "ina3221", "pmic", "estimate")


def test_cli_json_and_bad_source(tmp_path: Path) -> None:
    bundle, pub = _bundle(tmp_path)
    base = [sys.executable, "-m", "edgefleet.agent", "bench", str(bundle), "--key", str(pub)]
    ok = subprocess.run(
        [*base, "--source", str(VIDEO_PATH), "--frames", "10", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 3
    bad = subprocess.run(
        [*base, "--source", str(tmp_path / "nope.avi")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "nope.avi: OpenCV cannot open it" in bad.stderr
