"""Supplied labels from a watched folder: LABEL/IMAGE.png|jpg, each read once.

An operator (or a labelling tool on the device's network) drops images into
`labels_dir/LABEL/`, LABEL being one of the bundle's labels. A background thread scans the
folder every few seconds, decodes and preprocesses each new image for the running model and
queues the tensor; the inference loop, which alone may run the model, probes it at full depth
and hands it back; the scanner then moves the file to `.done/LABEL/` (or `.rejected/LABEL/`
with the reason logged and reported), so it is read once. Where the folder is read-only the
file is remembered for this run instead. Nothing here can stop the agent: every bad file is a
log line and a report naming it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet.agent.bundle import Preprocessing
from edgefleet.agent.runtime.preprocess import FrameError, Preprocessor

log = logging.getLogger(__name__)

SUFFIXES = (".png", ".jpg", ".jpeg")
DONE, REJECTED = ".done", ".rejected"
MAX_FILE_BYTES = 16 * 2**20  # a label image is a crop, not a poster: refuse before decoding
SETTLE_S = 1.0  # a file written less than this long ago may be incomplete: next scan
QUEUE_SIZE = 32  # tensors waiting for the loop; more files simply wait on disk

Reject = Callable[[Path, str], None]


@dataclass(frozen=True, eq=False)
class LabelledImage:
    """One supplied example, preprocessed for the model of `bundle_sha256`."""

    path: Path
    label: str
    class_index: int
    tensor: npt.NDArray[np.generic]
    bundle_sha256: str


@dataclass(frozen=True)
class _Model:
    labels: tuple[str, ...]
    pre: Preprocessor
    bundle_sha256: str


class LabelFolder:
    """The watched folder: a scanner thread in, take()/finish() for the inference loop."""

    def __init__(
        self,
        root: Path,
        *,
        labels: Sequence[str],
        preprocessing: Preprocessing,
        dtype: str,
        bundle_sha256: str,
        scan_s: float,
        on_reject: Reject,
    ) -> None:
        self.root = root
        self.scan_s = scan_s
        self.on_reject = on_reject
        self._model = _Model(tuple(labels), Preprocessor(preprocessing, dtype), bundle_sha256)
        self._ready: queue.Queue[LabelledImage] = queue.Queue(maxsize=QUEUE_SIZE)
        self._finished: queue.Queue[tuple[LabelledImage, str | None, bool]] = queue.Queue()
        self._in_flight: set[Path] = set()
        self._seen: set[Path] = set()  # handled files that could not be moved away
        self.consumed = 0
        self.rejected = 0
        self._missing_reported = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fed-labels", daemon=True)

    # -- the inference loop's side --------------------------------------------------------

    def take(self) -> LabelledImage | None:
        """The next image ready for the model, or None; never blocks."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return None

    def finish(self, item: LabelledImage, error: str | None = None, retry: bool = False) -> None:
        """The loop is done with item: consumed (error None), refused (error), or to be read
        again later (retry: the model changed before it was probed)."""
        self._finished.put((item, error, retry))
        self._wake.set()

    def set_model(self, labels: Sequence[str], preprocessing: Preprocessing, dtype: str,
                  bundle_sha256: str) -> None:
        """Another bundle runs: its labels and preprocessing apply from the next scan."""
        self._model = _Model(tuple(labels), Preprocessor(preprocessing, dtype), bundle_sha256)

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Scan in the background."""
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop scanning; files not yet consumed stay where they are."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._settle_finished()
                self._scan()
            except Exception:  # a bug here must not end supplied labels for the whole run
                log.exception("labels_dir %s: scan failed; trying again", self.root)
            self._wake.wait(self.scan_s)
            self._wake.clear()

    def scan_once(self) -> None:
        """One pass without the thread: settle what the loop finished, queue new files."""
        self._settle_finished()
        self._scan()

    def _settle_finished(self) -> None:
        while True:
            try:
                item, error, retry = self._finished.get_nowait()
            except queue.Empty:
                return
            self._in_flight.discard(item.path)
            if retry:
                continue
            if error is None:
                self.consumed += 1
                self._move(item.path, DONE)
            else:
                self._reject(item.path, error)

    def _files(self) -> list[tuple[Path, str | None]]:
        """(file, its label folder or None) for every candidate, oldest folders first."""
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            if not self._missing_reported:
                log.warning("labels_dir %s does not exist (yet); watching for it", self.root)
                self._missing_reported = True
            return []
        self._missing_reported = False
        found: list[tuple[Path, str | None]] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .done, .rejected, editors' temporary files
            if entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as inner:
                    names = sorted(e.name for e in inner if e.is_file(follow_symlinks=False))
                found.extend(
                    (Path(entry.path) / n, entry.name) for n in names if not n.startswith(".")
                )
            elif entry.is_file(follow_symlinks=False):
                found.append((Path(entry.path), None))
        return found

    def _scan(self) -> None:
        model = self._model
        now = time.time()
        for path, label in self._files():
            if path in self._in_flight or path in self._seen:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # moved away meanwhile
            if now - st.st_mtime < SETTLE_S:
                continue  # perhaps still being written
            why = self._check(path, label, st.st_size, model)
            if why is not None:
                self._reject(path, why)
                continue
            assert label is not None
            try:
                tensor = self._load(path, model)
            except (FrameError, ValueError, OSError, cv2.error) as exc:
                self._reject(path, str(exc))
                continue
            item = LabelledImage(
                path, label, model.labels.index(label), tensor, model.bundle_sha256
            )
            try:
                self._ready.put_nowait(item)
            except queue.Full:
                return  # the rest waits on disk for the next scan
            self._in_flight.add(path)

    @staticmethod
    def _check(path: Path, label: str | None, size: int, model: _Model) -> str | None:
        if label is None:
            return "not inside a LABEL/ folder"
        if path.suffix.lower() not in SUFFIXES:
            return f"not a {'/'.join(SUFFIXES)} file"
        if label not in model.labels:
            shown = ", ".join(model.labels[:20])
            return f"unknown label {label!r} (the model's labels: {shown})"
        if size > MAX_FILE_BYTES:
            return f"{size} bytes, over {MAX_FILE_BYTES}"
        return None

    @staticmethod
    def _load(path: Path, model: _Model) -> npt.NDArray[np.generic]:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR, as a camera delivers
        if image is None:
            raise ValueError("not a readable image")
        return model.pre(image)

    def _reject(self, path: Path, why: str) -> None:
        self.rejected += 1
        shown = self._shown(path)
        log.warning("labels_dir: %s refused: %s", shown, why)
        try:
            self.on_reject(path, why)
        except Exception:  # reporting must not stop the scan
            log.exception("labels_dir: reporting %s failed", shown)
        self._move(path, REJECTED)

    def _shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def _move(self, path: Path, where: str) -> None:
        rel = Path(self._shown(path))
        target = self.root / where / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # the same name supplied again: keep both
                target = target.with_name(f"{target.stem}-{time.time_ns()}{target.suffix}")
            os.replace(path, target)
        except OSError as exc:
            log.warning("labels_dir: cannot move %s to %s/ (%s); not read again this run",
                        rel, where, exc)
            self._seen.add(path)
