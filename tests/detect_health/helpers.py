"""Detect bundles with golden boxes, from the hand-made cell detector of tests/detect_agent.

`good` records its golden boxes through the real golden writer; `corrupted` ships a stage
whose box weights moved while keeping the good golden file, signed by the fleet key, so only
the device's health check can tell.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgefleet.agent.bundle import MANIFEST_NAME, ManifestBody, verify_bundle, write_bundle
from edgefleet.server.keystore import FleetKey
from edgefleet.server.optimize.detect.golden import write_detect_bundle_with_health
from tests.detect_agent.helpers import CELL, SIDE, cell_model, detect_body


def golden_inputs() -> np.ndarray:
    """Four 32x32 inputs: a square, two squares (one just above the 0.5 threshold), none."""
    x = np.zeros((4, 1, SIDE, SIDE), np.float32)
    x[0, 0, CELL : 2 * CELL, 2 * CELL : 3 * CELL] = 1.0  # cell (1, 2)
    x[1, 0, 0:CELL, 0:CELL] = 0.9
    x[1, 0, 3 * CELL :, 3 * CELL :] = 0.52  # within atol 0.05 of the threshold
    x[2, 0, 2 * CELL : 3 * CELL, CELL : 2 * CELL] = 0.3  # below the threshold: no box
    return x


def shifted_cell_model(dx: float) -> bytes:
    """The cell detector with every box centre moved dx pixels right (a corrupted weight)."""
    model = onnx.load_from_string(cell_model())
    for init in model.graph.initializer:
        if init.name == "cells":
            cells = numpy_helper.to_array(init).copy()
            cells[0, 0, :] += dx
            init.CopyFrom(numpy_helper.from_array(cells, "cells"))
    data: bytes = model.SerializeToString()
    return data


def good(root: Path, key: FleetKey, version: int) -> Path:
    """The cell detector as `cells-det` v<version> with a golden file recorded through it."""
    out = root / f"det-v{version}"
    write_detect_bundle_with_health(
        out,
        detect_body(version=version),
        {"model.onnx": cell_model()},
        key.private,
        golden_inputs(),
    )
    return out


def rewritten(
    src: Path, out: Path, key: FleetKey, files: dict[str, bytes] | None = None, **changes: object
) -> Path:
    """src with some files replaced and manifest keys changed, signed again by the fleet key."""
    m = verify_bundle(src, [key.public]).manifest
    new: dict[str, bytes | Path] = {name: (src / name).read_bytes() for name in m.files}
    new.update(files or {})
    body = json.loads((src / MANIFEST_NAME).read_bytes())
    for k in ("signer", "files"):
        body.pop(k)
    body.update(changes)
    write_bundle(out, ManifestBody.model_validate(body), new, key.private)
    return out


def corrupted(root: Path, key: FleetKey, version: int, dx: float = 4.0) -> Path:
    """A signed detect bundle whose boxes moved dx px from what its golden file recorded."""
    src = good(root / "src", key, version)
    stage = {"model.onnx": shifted_cell_model(dx)}
    return rewritten(src, root / f"det-v{version}-bad", key, stage, version=version)
