"""Record a bundle's health expectations: golden inputs/outputs and this host's latency.

The outputs come from the very stage files being shipped, run through the agent's own
runtime (StagedModel): the bundle is first written and verified without a health section in
a scratch directory, measured, then written again with the golden file and `health` added.
Stage files are byte-identical between the two writes, so the device compares against what
its exact bundle computed on the optimizer's host.
"""

from __future__ import annotations

import io
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import Manifest, ManifestBody, verify_bundle, write_bundle
from edgefleet.agent.bundle.manifest import HealthSpec
from edgefleet.agent.hardware import device_class
from edgefleet.agent.runtime.confidence import softmax
from edgefleet.agent.runtime.staged import StagedModel

GOLDEN_FILE = "golden.npz"
MAX_GOLDEN = 8
LATENCY_RUNS = 20


def synthetic_inputs(body: ManifestBody, n: int = 2) -> npt.NDArray[np.generic]:
    """A deterministic input of the right shape (for the NaN/determinism check only)."""
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in body.input.shape][1:]
    rng = np.random.default_rng(0)
    if body.input.dtype == "uint8":
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    return rng.standard_normal((n, *shape)).astype(np.float32)


def golden_arrays(model: StagedModel, inputs: npt.NDArray[np.generic]) -> dict[str, np.ndarray]:
    """probs (final head, exits disabled), exit_index and class_index (default point)."""
    probs, exits, classes = [], [], []
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1]
        probs.append(softmax(model.all_exit_logits(x)[-1])[0])
        pred = model.predict(x)
        exits.append(pred.exit_index)
        classes.append(pred.class_index)
    return {
        "inputs": inputs,
        "probs": np.asarray(probs, dtype=np.float32),
        "exit_index": np.asarray(exits, dtype=np.int64),
        "class_index": np.asarray(classes, dtype=np.int64),
    }


def median_full_depth_ms(model: StagedModel, x: npt.NDArray[np.generic]) -> float:
    """Median ms per frame with every exit disabled (what a device compares against)."""
    saved = list(model.thresholds)
    model.set_thresholds([None] * len(model.early_exits))
    try:
        model.warm_up(2)
        times = []
        for _ in range(LATENCY_RUNS):
            t0 = time.perf_counter()
            model.predict(x)
            times.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(times)
    finally:
        model.set_thresholds(saved)


def write_bundle_with_health(
    out_dir: Path,
    body: ManifestBody,
    files: Mapping[str, bytes | Path],
    key: Ed25519PrivateKey,
    inputs: npt.NDArray[np.generic],
    kind: Literal["validation", "synthetic"],
) -> Manifest:
    """write_bundle, plus golden.npz from up to 8 of `inputs` and the manifest's health."""
    inputs = np.ascontiguousarray(inputs[:MAX_GOLDEN]).astype(np.dtype(body.input.dtype))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.golden-"))
    try:
        write_bundle(scratch / "probe", body, files, key)
        model = StagedModel(verify_bundle(scratch / "probe", [key.public_key()]))
        arrays = golden_arrays(model, inputs)
        latency = median_full_depth_ms(model, inputs[:1])
        del model
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        health = HealthSpec(
            golden_file=GOLDEN_FILE,
            golden_kind=kind,
            latency_ms={device_class(): round(latency, 4)},
        )
        final_body = body.model_copy(update={"health": health})
        manifest = write_bundle(out_dir, final_body, {**files, GOLDEN_FILE: buf.getvalue()}, key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest
