"""Which frames feed a federated round, and the buffers their exit features go to.

A frame that leaves at an early exit never reaches the final head, so it has no pseudo
label; every probe_every-th frame is therefore run at full depth (StagedModel.probe_frame)
and its early exits' features are kept with the final head's prediction and confidence.
Supplied labels (agent/federated/labels.py) go to a buffer of their own, so the stream of
probed frames never pushes them out. Only features are kept, never a frame.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from edgefleet.agent.runtime.staged import Probe

from .buffer import FeatureBuffer

log = logging.getLogger(__name__)

LabelMode = Literal["pseudo", "supplied", "both"]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Examples:
    """One exit's labelled features: x (n, D), y (n,), and which rows have supplied labels."""

    x: F32
    y: I64
    supplied: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _empty() -> Examples:
    return Examples(
        np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, dtype=np.bool_)
    )


def _from(buffer: FeatureBuffer, head: int, min_confidence: float, supplied: bool) -> Examples:
    if len(buffer) == 0:
        return _empty()
    try:
        x, y = buffer.examples(head, min_confidence=min_confidence)
    except IndexError:  # the bundle has fewer early exits than the head asked for
        return _empty()
    return Examples(x, y, np.full(y.shape[0], supplied, dtype=np.bool_))


class FeatureCollector:
    """Probe schedule plus the pseudo-labelled and supplied buffers of one running bundle.

    The inference loop calls due() and add_probe()/add_supplied(); the round's worker
    thread calls examples(). When the model changes, reset() starts empty buffers: features
    of another backbone mean nothing to the new bundle's heads.
    """

    def __init__(
        self, probe_every: int, buffer_size: int, supplied_size: int, bundle_sha256: str
    ) -> None:
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every}")
        self.probe_every = probe_every
        self._sizes = (buffer_size, supplied_size)
        self._lock = threading.Lock()
        self._frames = 0
        self._bad_reported = False
        self._bundle = bundle_sha256
        self._pseudo = FeatureBuffer(buffer_size)
        self._supplied = FeatureBuffer(supplied_size)

    @property
    def bundle_sha256(self) -> str:
        """Manifest sha256 of the bundle whose features the buffers hold."""
        with self._lock:
            return self._bundle

    def reset(self, bundle_sha256: str) -> None:
        """Another bundle runs: forget what the previous one's exits saw."""
        with self._lock:
            self._bundle = bundle_sha256
            self._pseudo = FeatureBuffer(self._sizes[0])
            self._supplied = FeatureBuffer(self._sizes[1])
            self._frames = 0

    def due(self) -> bool:
        """Is this frame one to probe? Counts frames; the first one of a run is probed."""
        due = self._frames % self.probe_every == 0
        self._frames += 1
        return due

    def add_probe(self, probe: Probe) -> None:
        """A probed camera frame: the final head's prediction is its pseudo label."""
        pred = probe.prediction
        self._add(probe, pred.class_index, pred.confidence, supplied=False)

    def add_supplied(self, probe: Probe, class_index: int) -> None:
        """An image with a label someone supplied (confidence 1: it is not a guess)."""
        self._add(probe, class_index, 1.0, supplied=True)

    def _add(self, probe: Probe, label: int, confidence: float, *, supplied: bool) -> None:
        with self._lock:
            buffer = self._supplied if supplied else self._pseudo
        try:
            buffer.add(
                probe.features,
                label,
                min(1.0, max(0.0, confidence)),
                "supplied" if supplied else "pseudo",
            )
        except ValueError as exc:  # NaN features from a broken model: skip, say so once
            if not self._bad_reported:
                log.warning("federated: a probed frame was not kept: %s", exc)
                self._bad_reported = True

    def counts(self) -> dict[str, int]:
        """Examples held now, and probed frames ever added (for logs and events)."""
        with self._lock:
            pseudo, supplied = self._pseudo, self._supplied
        return {
            "pseudo": len(pseudo),
            "supplied": len(supplied),
            "probed": pseudo.added,
            "nbytes": pseudo.nbytes + supplied.nbytes,
        }

    def examples(
        self, head: int, labels: LabelMode, min_confidence: float
    ) -> tuple[str, Examples]:
        """(bundle sha256, examples) of one early exit under a round's label rule.

        pseudo: probed frames whose final prediction reached min_confidence; supplied: only
        supplied labels; both: the supplied examples and those pseudo ones together.
        """
        with self._lock:
            bundle, pseudo, supplied = self._bundle, self._pseudo, self._supplied
        # Above any softmax probability: no pseudo label passes (supplied ones always do).
        parts = []
        if labels in ("supplied", "both"):
            parts.append(_from(supplied, head, 2.0, supplied=True))
        if labels in ("pseudo", "both"):
            parts.append(_from(pseudo, head, min_confidence, supplied=False))
        parts = [p for p in parts if len(p)]
        if not parts:
            return bundle, _empty()
        if len(parts) == 1:
            return bundle, parts[0]
        if parts[0].x.shape[1] != parts[1].x.shape[1]:
            raise ValueError(f"exit {head}: supplied and probed features differ in width")
        return bundle, Examples(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.supplied for p in parts]),
        )
