"""Run a verified detect bundle: stages in order, the declared outputs decoded to frame boxes.

A detector has no early exits: every frame runs every stage, the last stage's
`manifest.detection.outputs` are decoded (agent/detect/decode.py, boxes in input-tensor
pixels) and mapped back through the preprocessing's resize (agent/detect/geometry.py) to
the camera frame's pixels, which is what events, zones and results speak.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgefleet.agent.bundle import VerifiedBundle
from edgefleet.agent.bundle.manifest import Detection
from edgefleet.agent.detect.boxes import Detections
from edgefleet.agent.detect.decode import DecodeError, decode, score_thresholds
from edgefleet.agent.detect.geometry import Letterbox

from .preprocess import Frame, Preprocessor
from .providers import AUTO
from .session import choose_providers, report_fallback, session_options
from .staged import RuntimeLoadError

log = logging.getLogger(__name__)

__all__ = ["DecodeError", "DetectorModel", "FrameDetections", "RuntimeLoadError"]


@dataclass(slots=True)
class FrameDetections:
    """One frame's boxes in frame pixels, best first, and the time each stage took."""

    detections: Detections
    stage_ms: list[float] = field(default_factory=list)


class DetectorModel:
    """Sessions for every stage of a detect bundle, and the decoder its manifest declares.

    Offers what the agent's loop asks of any model (manifest, verified, early_exits,
    thresholds, set_thresholds, warm_up), so the loop treats both kinds alike where they are
    alike; `thresholds` are per-class score thresholds by label on this device
    (config detect.class_thresholds), which win over the bundle's own.
    """

    def __init__(
        self,
        verified: VerifiedBundle,
        *,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        class_thresholds: Mapping[str, float] | None = None,
    ) -> None:
        m = verified.manifest
        if m.task != "detect" or m.detection is None:
            raise RuntimeLoadError(f"{verified.path}: task {m.task!r} is not a detector")
        self.manifest = m
        self.verified = verified
        self.spec: Detection = m.detection
        # No early exits: the loop's window has one exit bucket (every frame run).
        self.early_exits: list[object] = []
        self.thresholds: list[float | None] = []
        if providers is not None and AUTO in providers:
            # The probe of providers.py runs classifiers; a detector keeps the CPU until a
            # probe for it exists (docs/detect.md).
            log.info("%s: providers 'auto' keeps CPU for a detector", verified.path)
            providers = None
        chosen = choose_providers(providers)
        self.providers = chosen
        self.sessions: list[ort.InferenceSession] = []
        for stage in m.stages:
            try:
                sess = ort.InferenceSession(
                    verified.read(stage.file), session_options(threads), providers=chosen
                )
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise RuntimeLoadError(f"{verified.path}/{stage.file}: {exc}") from exc
            self.sessions.append(sess)
        report_fallback(self.sessions[0], chosen, f"{verified.path}/{m.stages[0].file}")
        last_outputs = {o.name for o in self.sessions[-1].get_outputs()}
        missing = [name for name in self.spec.outputs if name not in last_outputs]
        if missing:
            raise RuntimeLoadError(
                f"{verified.path}/{m.stages[-1].file}: detection.outputs {missing} are not "
                f"outputs of the last stage (it has {sorted(last_outputs)})"
            )
        self._fetch = [list(stage.outputs) for stage in m.stages[:-1]] + [list(self.spec.outputs)]
        self.input_hw = (m.preprocessing.height, m.preprocessing.width)
        self._by_index: dict[int, float] = {}
        self.set_class_thresholds(class_thresholds or {})
        self._geometry: tuple[tuple[int, int], Letterbox] | None = None

    def set_class_thresholds(self, by_label: Mapping[str, float]) -> None:
        """This device's score threshold per label; a label the bundle lacks is a ValueError."""
        index = {label: i for i, label in enumerate(self.manifest.labels)}
        unknown = sorted(set(by_label) - set(index))
        if unknown:
            raise ValueError(
                f"detect.class_thresholds names label(s) {unknown} that bundle "
                f"{self.manifest.model_id} v{self.manifest.version} does not have "
                f"(labels: {self.manifest.labels[:20]})"
            )
        by_index = {index[label]: float(t) for label, t in by_label.items()}
        # Checked once here (range, bundle's own class_thresholds), not on the first frame.
        score_thresholds(self.spec, self.manifest.labels, thresholds=by_index)
        self._by_index = by_index

    def set_thresholds(self, thresholds: Sequence[float | None]) -> None:
        """Operating points of a detector have no exit thresholds: only [] is accepted."""
        if len(thresholds) != 0:
            raise ValueError(f"{len(thresholds)} thresholds for a detector (it has no exits)")

    def warm_up(self, runs: int = 3) -> float:
        """Run every stage on a blank input (sessions allocate on first runs); seconds taken."""
        t0 = time.perf_counter()
        tensor = self.manifest.input
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in tensor.shape]
        blank = np.zeros(shape, dtype=np.dtype(tensor.dtype))
        for _ in range(runs):
            self.run(blank)
        return time.perf_counter() - t0

    def run(self, x: npt.NDArray[np.generic]) -> tuple[list[npt.NDArray[np.generic]], list[float]]:
        """The last stage's declared outputs for one preprocessed input, and each stage's ms."""
        tensors: dict[str, npt.NDArray[np.generic]] = {self.manifest.input.name: x}
        stage_ms: list[float] = []
        outs: list[npt.NDArray[np.generic]] = []
        clock = time.perf_counter
        for stage, sess, fetch in zip(
            self.manifest.stages, self.sessions, self._fetch, strict=True
        ):
            t0 = clock()
            outs = sess.run(fetch, {name: tensors[name] for name in stage.inputs})
            stage_ms.append((clock() - t0) * 1000.0)
            tensors.update(zip(fetch, outs, strict=True))
        return outs, stage_ms

    def detect(self, x: npt.NDArray[np.generic], frame_hw: tuple[int, int]) -> FrameDetections:
        """Boxes of one preprocessed input, mapped to a frame of frame_hw (height, width).

        Raises DecodeError when the outputs do not fit the bundle's declaration.
        """
        outs, stage_ms = self.run(x)
        found = decode(
            outs, self.spec, self.manifest.labels, self.input_hw, thresholds=self._by_index
        )
        if len(found):
            found = self._letterbox(frame_hw).detections_to_frame(found)
        return FrameDetections(found, stage_ms)

    def detect_frame(self, frame: Frame, pre: Preprocessor) -> FrameDetections:
        """Preprocess one camera frame (FrameError if it cannot be) and detect in it."""
        x = pre(frame)
        return self.detect(x, (int(frame.shape[0]), int(frame.shape[1])))

    def _letterbox(self, frame_hw: tuple[int, int]) -> Letterbox:
        # A camera keeps its frame size: the mapping is worked out once per size.
        cached = self._geometry
        if cached is None or cached[0] != frame_hw:
            cached = (frame_hw, Letterbox.from_spec(frame_hw, self.manifest.preprocessing))
            self._geometry = cached
        return cached[1]
