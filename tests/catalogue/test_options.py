"""Build options -> the optimizer's command line; the build log's progress and error lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgefleet.server.catalogue.buildlog import Progress, tail
from edgefleet.server.catalogue.options import BuildOptions, ModelOptions, optimize_args
from edgefleet.server.cli.app import build_parser


def test_only_chosen_options_become_arguments_in_the_optimizers_own_spelling() -> None:
    opts = BuildOptions(
        max_drop=0.02,
        quantization="dynamic",
        exits=["block1_out", "block2_out"],
        prune=0.25,
        low_rank=0.95,
        share=16,
        calibration="entropy",
        head_precision="int8",
        threads=2,
        size="64x48",
        color="GRAY",
        layout="NCHW",
        mean=[0.1307],
        std=[0.3081],
        scale=1.0,
        resize="letterbox",
        interpolation="area",
    )
    args = optimize_args(opts)
    assert args == [
        "--max-drop=0.02",
        "--quantization=dynamic",
        "--calibration=entropy",
        "--head-precision=int8",
        "--exits=block1_out,block2_out",
        "--prune=0.25",
        "--low-rank=0.95",
        "--share=16",
        "--threads=2",
        "--size=64x48",
        "--color=GRAY",
        "--layout=NCHW",
        "--mean=0.1307",
        "--std=0.3081",
        "--scale=1",
        "--resize=letterbox",
        "--interpolation=area",
    ]
    assert optimize_args(BuildOptions()) == []
    assert optimize_args(BuildOptions(exits="none")) == ["--exits=none"]
    # The optimizer's own parser takes every one of them, with the values meant.
    ns = build_parser().parse_args(["optimize", "m.onnx", "--data", "d", "--out", "o", *args])
    assert (ns.max_drop, ns.exits, ns.prune, ns.low_rank, ns.share) == (
        0.02, "block1_out,block2_out", 0.25, 0.95, 16,
    )
    assert (ns.mean, ns.std, ns.scale, ns.size, ns.threads) == ("0.1307", "0.3081", 1.0, "64x48", 2)


def test_a_builds_options_override_the_models_and_inherit_the_rest() -> None:
    model = ModelOptions(model_id="digits", mean=[0.5], std=[0.25], max_drop=0.02)
    build = BuildOptions(max_drop=0.005, prune=0.5)
    merged = build.over(model.build_defaults())
    assert merged.chosen() == {"max_drop": 0.005, "prune": 0.5, "mean": [0.5], "std": [0.25]}
    assert merged.to_json() == (
        '{"max_drop": 0.005, "mean": [0.5], "prune": 0.5, "std": [0.25]}'
    )
    assert BuildOptions.model_validate_json(merged.to_json()) == merged


@pytest.mark.parametrize(
    "bad",
    [
        {"max_drop": 2},
        {"prune": 1.0},
        {"quantization": "int4"},
        {"exits": []},
        {"exits": ["--keys-dir=/tmp"]},
        {"exits": ["a,b"]},
        {"size": "-1"},
        {"std": [0.0]},
        {"mean": [float("nan")]},
        {"keys_dir": "/tmp"},  # not a build option: where the bundle is signed is the runner's
        {"model_id": "x"},  # a model's, not a build's
    ],
)
def test_options_the_optimizer_would_refuse_are_refused_here(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BuildOptions.model_validate(bad)


def test_progress_lines_and_the_error_line() -> None:
    p = Progress()
    for line in [
        "[1/7] preparing source.onnx",
        "      fixed input shape to [1, 1, 64, 64]",
        "[2/7] fp32 validation accuracy 0.9920, 42.8 M MACs",
        "2026-12-03 12:18:24,593 INFO edgefleet.x: something",
    ]:
        p.feed(line + "\n")
    assert (p.step, p.steps, p.line) == (2, 7, "[2/7] fp32 validation accuracy 0.9920, 42.8 M MACs")
    assert p.changed
    p.feed("edgefleet optimize: error: no operating point keeps validation accuracy within 0\n")
    assert p.failure(1) == "no operating point keeps validation accuracy within 0"
    crashed = Progress()
    crashed.feed("Traceback (most recent call last):\n")
    crashed.feed('  File "x.py", line 1, in <module>\n')
    crashed.feed("numpy.core._exceptions._ArrayMemoryError: out of memory\n")
    assert crashed.failure(1) == "_ArrayMemoryError: out of memory"
    uncaught = Progress()
    uncaught.feed("edgefleet.server.optimize.errors.ModelError: m.onnx: not an ONNX model\n")
    assert uncaught.failure(1) == "m.onnx: not an ONNX model"
    assert Progress().failure(-9) == "the optimizer was killed by signal 9"


def test_tail_reads_the_end_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text("".join(f"line {i}\n" for i in range(20_000)))
    assert tail(log, 3) == ["line 19997", "line 19998", "line 19999"]
    assert len(tail(log, 100_000)) < 20_000  # at most the last 64 KiB, first partial line cut
    assert tail(log, 100_000)[0].startswith("line ")
    assert tail(tmp_path / "none.log", 5) == []
