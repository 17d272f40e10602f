"""Turn stages, heads and operating points into a signed bundle via agent.bundle."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.agent import __version__
from edgefleet.agent.bundle import (
    ExitHead,
    Manifest,
    ManifestBody,
    Metrics,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
    write_bundle,
)
from edgefleet.server.keystore import FleetKey

from .exits import ExitPlan
from .golden import write_bundle_with_health
from .macs import total_macs
from .options import OptimizeOptions
from .split import StageGraph


def point_names(n: int) -> list[str]:
    """Operating point names from accurate to fast."""
    if n == 1:
        return ["only"]
    return ["accurate", *[f"balanced-{i}" for i in range(1, n - 1)], "fast"]


def assemble_bundle(
    out: Path,
    *,
    stages: list[StageGraph],
    plan: ExitPlan | None,
    spec: Preprocessing,
    labels: list[str],
    input_name: str,
    input_shape: list[int],
    model_id: str,
    version: int,
    source_sha256: str,
    source_name: str,
    opts: OptimizeOptions,
    calibration: str,
    key: FleetKey,
    golden_inputs: npt.NDArray[np.float32] | None = None,
    metrics: Metrics | None = None,
) -> Manifest:
    """Write the signed bundle directory `out` and return its manifest.

    golden_inputs (preprocessed validation inputs, never test) add the device's health check:
    golden.npz computed through this very bundle and this host's latency (golden.py).
    """
    files: dict[str, bytes] = {}
    manifest_stages: list[Stage] = []
    last = len(stages) - 1
    for k, sg in enumerate(stages):
        name = f"stage{k}.onnx"
        files[name] = sg.model.SerializeToString()
        if k < last:
            assert plan is not None and sg.exit_model is not None  # early stages come with exits
            head_file, graph_file = f"heads/exit{k}.npz", f"exits/exit{k}.onnx"
            files[head_file] = plan.heads[k].to_npz_bytes()
            files[graph_file] = sg.exit_model.SerializeToString()
            exit_ = ExitHead(
                output=sg.exit_output,
                kind="features",
                head_file=head_file,
                graph_file=graph_file,
                rule=plan.rule,
            )
        else:
            exit_ = ExitHead(output=sg.exit_output, kind="logits", rule=opts.exit_rule)
        manifest_stages.append(
            Stage(
                file=name,
                inputs=sg.inputs,
                outputs=sg.outputs,
                exit=exit_,
                macs=total_macs(sg.model),
            )
        )
    points = []
    default = 0
    if plan is not None:
        names = point_names(len(plan.points))
        points = [p.to_operating_point(n) for p, n in zip(plan.points, names, strict=True)]
        default = plan.default
    optimizer: dict[str, str | int | float | bool | list[str] | None] = {
        "quantization": opts.quantization,
        "calibration": opts.calibration,
        "reduce_range": opts.reduce_range,
        "head_precision": opts.head_precision,
        "max_drop": opts.max_drop,
        "confidence": opts.confidence,
        "speed_control": opts.speed_control,
        "exits": "auto" if isinstance(opts.exits, str) else ",".join(opts.exits),
        "exit_rule": opts.exit_rule,
        "exit_grid": opts.exit_grid,
        "stage_layout": opts.stage_layout,
        "prune": opts.prune,
        "low_rank": opts.low_rank,
        "share": opts.share,
    }
    body = ManifestBody(
        model_id=model_id,
        version=version,
        created_ts=time.time(),
        input=TensorSpec(name=input_name, shape=list(input_shape), dtype="float32"),
        preprocessing=spec,
        labels=labels,
        stages=manifest_stages,
        operating_points=points,
        default_operating_point=default,
        provenance=Provenance(
            source_model_sha256=source_sha256,
            source_model_name=source_name,
            optimizer=optimizer,
            calibration=calibration,
            tool=f"edgefleet {__version__}",
        ),
        metrics=metrics or Metrics(),
    )
    if golden_inputs is not None and len(golden_inputs):
        return write_bundle_with_health(
            out, body, files, key.private, golden_inputs, kind="validation"
        )
    return write_bundle(out, body, files, key.private)
