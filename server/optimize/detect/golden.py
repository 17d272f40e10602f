"""Record a detect bundle's health expectations: golden inputs, their boxes, this host's latency.

As for classifiers (server/optimize/golden.py): the bundle is first written and verified
without a health section in a scratch directory, its boxes are recorded through the agent's
own DetectorModel and the same decode a device runs (agent/update/health.py `detect_input`),
then it is written again with the golden file and `health` added. Stage files are
byte-identical between the two writes, so a device compares against what its exact bundle
found on the optimizer's host.

Golden file (HealthSpec's docstring): `inputs` (N, *input shape without batch), `boxes`
(M, 4) float32 xyxy in input-tensor pixels, `scores` (M,) float32, `classes` (M,) int64,
`image_index` (M,) int64, at the bundle's own thresholds.
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
from edgefleet.agent.runtime.detector import DetectorModel
from edgefleet.agent.update.health import DEFAULT_MIN_IOU, detect_input

GOLDEN_FILE = "golden.npz"
MAX_GOLDEN = 8
LATENCY_RUNS = 20


def detect_golden_arrays(
    model: DetectorModel, inputs: npt.NDArray[np.generic]
) -> dict[str, np.ndarray]:
    """inputs, and every input's boxes, scores, classes and image_index (input-tensor px)."""
    boxes, scores, classes, index = [], [], [], []
    for i in range(inputs.shape[0]):
        found = detect_input(model, inputs[i : i + 1])
        boxes.append(found.boxes)
        scores.append(found.scores)
        classes.append(found.classes)
        index.append(np.full(len(found), i, np.int64))
    return {
        "inputs": inputs,
        "boxes": np.concatenate(boxes).astype(np.float32).reshape(-1, 4),
        "scores": np.concatenate(scores).astype(np.float32),
        "classes": np.concatenate(classes).astype(np.int64),
        "image_index": np.concatenate(index).astype(np.int64),
    }


def median_detect_ms(model: DetectorModel, x: npt.NDArray[np.generic]) -> float:
    """Median ms per frame, every stage then decode (what a device's check times)."""
    model.warm_up(2)
    times = []
    for _ in range(LATENCY_RUNS):
        t0 = time.perf_counter()
        detect_input(model, x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def write_detect_bundle_with_health(
    out_dir: Path,
    body: ManifestBody,
    files: Mapping[str, bytes | Path],
    key: Ed25519PrivateKey,
    inputs: npt.NDArray[np.generic],
    kind: Literal["validation", "synthetic"] = "validation",
    *,
    min_iou: float = DEFAULT_MIN_IOU,
) -> Manifest:
    """write_bundle for a detect body, plus golden.npz from up to 8 of `inputs` and `health`.

    `inputs` are preprocessed (N, *input shape without batch) or with a batch of one each
    ((N, 1, C, H, W) is accepted and squeezed), as the optimizer's validation tensors are.
    """
    if body.task != "detect":
        raise ValueError(f"task {body.task!r}: a classifier's golden is server/optimize/golden.py")
    dtype = np.dtype(body.input.dtype)
    x = np.asarray(inputs)
    rank = len(body.input.shape)
    if x.ndim == rank + 1 and x.shape[1] == 1:
        x = x[:, 0]
    x = np.ascontiguousarray(x[:MAX_GOLDEN]).astype(dtype)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.golden-"))
    try:
        write_bundle(scratch / "probe", body.model_copy(update={"health": None}), files, key)
        model = DetectorModel(verify_bundle(scratch / "probe", [key.public_key()]))
        arrays = detect_golden_arrays(model, x)
        latency = median_detect_ms(model, x[:1])
        del model
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        health = HealthSpec(
            golden_file=GOLDEN_FILE,
            golden_kind=kind,
            latency_ms={device_class(): round(latency, 4)},
            min_iou=min_iou,
        )
        final_body = body.model_copy(update={"health": health})
        manifest = write_bundle(out_dir, final_body, {**files, GOLDEN_FILE: buf.getvalue()}, key)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest
