"""bench.federated in a reduced mode: every figure is there and sane, and the rounds went
through the engine as they should (not whether federated learning pays off: the full run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.federated import main
from bench.federated_peer import flower_version

KEYS = [
    "exit_rate_first",
    "exit_rate_last",
    "latency_ratio_last_vs_first",
    "acc_last",
    "acc_central",
    "acc_clean",
    "acc_poisoned_robust",
    "acc_poisoned_fedavg",
    "bytes_per_device_round",
    "bytes_per_device_round_uncompressed",
    "flower_acc",
    "flower_s_per_round",
    "ours_s_per_round",
    "fps_during_training_ratio",
]


@pytest.mark.timeout(240)
def test_federated_bench_reports_every_figure(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "federated.json"
    args = ["--quick", "--devices", "4", "--rounds", "2", "--frames-per-device", "60"]
    args += ["--min-samples", "8", "--fps-window", "1", "--fps-budget", "1"]
    args += ["--fps-repeats", "1", "--latency-passes", "1", "--out", str(out)]
    assert main(args, emit=lines.append) == 0
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text())
    assert all(k in report for k in KEYS), sorted(set(KEYS) - set(report))

    clean = report["per_round"]
    assert clean["round"] == [0, 1, 2]
    assert clean["state"] == [None, "done", "done"], clean["reason"]
    assert clean["updates_accepted"][1:] == [4, 4]
    held = report["settings"]["holdout_frames"]
    for rate, acc, num_rate, num_acc in zip(
        clean["exit_rate"],
        clean["accuracy"],
        clean["exit_rate_numeric"],
        clean["accuracy_numeric"],
        strict=True,
    ):
        assert 0 <= rate <= 1 and 0 <= acc <= 1
        # The real StagedModel and the numeric decision on probed features agree (a frame
        # exactly at a threshold may go either way).
        assert abs(rate - num_rate) <= 2 / held and abs(acc - num_acc) <= 2 / held
    assert all(ms > 0 for ms in clean["latency_ms"]) and report["latency_ratio_last_vs_first"] > 0
    # A heads-only version: the delta is a small part of the full archive.
    assert all(0 < b < 200_000 for b in clean["delta_bundle_bytes"][1:])

    # fp16 on the wire: exactly half the float32 bytes; q8 about a quarter (+ scale, offset).
    assert report["compression"] == "fp16"
    raw = report["bytes_per_device_round_uncompressed"]
    assert report["bytes_per_device_round"] == raw / 2
    assert raw / 4 < report["bytes_per_device_round_q8"] < raw / 4 + 100
    assert report["message_bytes_per_device_round"] > report["bytes_per_device_round"]

    # The robust run's hostile device sends NaN in even rounds: rejected by validation, with
    # the reason; FedAvg's attackers send what passes validation, so nothing is rejected.
    poisoned = report["poisoned"]
    nan_device = poisoned["hostile_devices"][0]
    for aggregator in ("trimmed_mean", "median"):
        run = poisoned[aggregator]
        assert run["state"] == ["done", "done"], run
        assert run["rejected"][0] == {} and set(run["rejected"][1]) == {nan_device}
        assert "non-finite" in run["rejected"][1][nan_device]
    assert poisoned["fedavg"]["rejected"] == [{}, {}]

    for key in ("acc_central", "acc_clean", "acc_poisoned_robust", "acc_poisoned_fedavg"):
        assert 0 <= report[key] <= 1, key
    assert report["ours_s_per_round"] > report["ours_local_s_per_round"] > 0
    if flower_version() is None:
        assert report["flower_acc"] is None and report["flower_s_per_round"] is None
        assert "flower-peer.sh" in report["flower"]["note"]
    else:
        assert 0 <= report["flower_acc"] <= 1 and report["flower_s_per_round"] > 0
    assert 0 < report["fps_during_training_ratio"] < 3, report["fps"]
    (fps_run,) = report["fps"]["unpaced"]["runs"]
    # It trained (how long depends on the CPU: 0.36 s on a fast one, under 0.5 s).
    assert fps_run["train_cpu_s"] > 0 and fps_run["fps_before"] > 0
    assert len(report["choice"]["grid"]) == 1
    if report["plot"] is not None:
        assert Path(report["plot"]).stat().st_size > 1000
