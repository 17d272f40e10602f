"""The reference model optimized once: what bench.optimize and bench.agent time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.report import say
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.reference import MODEL_PATH, load_reference_split, reference_preprocessing

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]


def write_reference_npz(path: Path) -> dict[str, Any]:
    """The reference split as <split>_images / <split>_labels; returns the test split."""
    splits = load_reference_split()
    write_splits_npz(splits, path)
    return {"images": splits["test"][0], "labels": splits["test"][1]}


def run_optimizer(work: Path) -> tuple[Path, FleetKey, dict[str, Any], U8]:
    """optimize() with default options on the reference model; returns out dir, key, report.

    The fourth value is the test split's images, for timing on data the optimizer never saw.
    """
    test = write_reference_npz(work / "reference.npz")
    key, _ = init_key(work / "keys")
    out = work / "opt"
    t0 = time.monotonic()
    report = optimize(
        MODEL_PATH,
        work / "reference.npz",
        out,
        reference_preprocessing(),
        key,
        OptimizeOptions(),
        progress=lambda m: say(f"  {m}"),
    )
    say(f"optimizer finished in {time.monotonic() - t0:.1f} s")
    images: U8 = test["images"]
    return out, key, report, images


def preprocessed(images: U8, n: int) -> list[F32]:
    """The first n test images through the agent's own preprocessing, one (1,1,64,64) each."""
    batch = np.asarray(Preprocessor(reference_preprocessing()).batch(list(images[:n])), np.float32)
    return [batch[i : i + 1] for i in range(batch.shape[0])]
