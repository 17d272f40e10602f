"""The agent process: verified bundle, camera, staged inference, telemetry, commands.

One loop does the inference and owns the model; the camera and MQTT run in their own
threads. The loop never waits on the network: telemetry and events go to the on-disk outbox
and the link drains it whenever the broker is there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias

import cv2
import psutil
from pydantic import JsonValue

from edgefleet.agent import __version__
from edgefleet.agent.bundle import BundleError, KeyFileError, verify_bundle
from edgefleet.agent.bundle.trust import TrustStore
from edgefleet.agent.camera import Camera, Frame
from edgefleet.agent.commands import CommandHandler
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.federated.collect import FeatureCollector
from edgefleet.agent.federated.labels import LabelFolder
from edgefleet.agent.federated.local import RunningBundle
from edgefleet.agent.federated.worker import FedWorker
from edgefleet.agent.governor import Governor
from edgefleet.agent.hardware import describe, device_class
from edgefleet.agent.link import Link, TlsSetupError
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.overflow import OverflowReporter
from edgefleet.agent.power import PowerMeter, detect, detect_temperature
from edgefleet.agent.protocol import (
    Event,
    InstallBundle,
    KeyTrust,
    ProtocolError,
    Result,
    RollbackBundle,
    Status,
    Telemetry,
    decode,
    encode,
)
from edgefleet.agent.runtime.detector import DecodeError, DetectorModel
from edgefleet.agent.runtime.preprocess import FrameError, Preprocessor
from edgefleet.agent.runtime.staged import RuntimeLoadError, StagedModel
from edgefleet.agent.systemd import Notifier, WatchdogFeeder
from edgefleet.agent.update.manager import Running, UpdateManager, previous_manifest_sha256
from edgefleet.agent.update.slots import RecoveryReport, Slots
from edgefleet.agent.window import TelemetryWindow

if TYPE_CHECKING:
    from edgefleet.agent.bundle.manifest import Gate, Manifest
    from edgefleet.agent.runtime.objects import DetectPipeline, Step

log = logging.getLogger(__name__)

# What a bundle's manifest.task makes of it: a classifier's early-exit stages or a detector.
Model: TypeAlias = "StagedModel | DetectorModel"

EXIT_OK, EXIT_CONFIG, EXIT_LOCKED = 0, 2, 3
LOAD_TIMEOUT_S = 600.0  # start-up time asked for while the bundle loads and warms up
FIRST_FRAME_EXTEND_S = 60.0  # asked for again and again until the first frame arrives
SHUTDOWN_BUDGET_S = 3.5  # from leaving the loop to exit; the loop itself leaves within 0.5 s
OVERFLOW_REPORTED = "overflow_reported"  # outbox counter: drops covered by an event so far


class AgentError(Exception):
    """The agent cannot start; the message says what to fix. Exit status in .code."""

    def __init__(self, message: str, code: int = EXIT_CONFIG) -> None:
        super().__init__(message)
        self.code = code


def acquire_lock(state_dir: Path, device_id: str) -> IO[str]:
    """One agent per device id on this machine: a second one refuses to start."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"agent-{device_id}.lock"
    fh = path.open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise AgentError(
            f"another edgefleet-agent runs as device {device_id} (pid {pid}, lock {path})",
            EXIT_LOCKED,
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def bundle_path(cfg: AgentConfig) -> Path:
    """The bundle the agent runs: the installed current one, else model.bundle.

    model.bundle is where a device starts (the installer's, or a fixed one for tests); once
    the coordinator has installed a bundle under state_dir, that one runs.
    """
    installed = cfg.state_dir / "bundles" / "current"
    if cfg.model.bundle is None or os.path.lexists(installed):
        return installed
    return cfg.model.bundle


def trust_store(cfg: AgentConfig) -> TrustStore:
    """The keys this device trusts: its config's, changed by accepted key statements."""
    return TrustStore.open(cfg.model.trusted_keys, cfg.state_dir)


def recover_bundles(cfg: AgentConfig) -> RecoveryReport | None:
    """Finish or undo what a killed install left under state_dir/bundles; None if nothing."""
    if not (cfg.state_dir / "bundles").is_dir():
        return None
    try:
        keys = trust_store(cfg).unrevoked_keys()
    except KeyFileError as exc:
        raise AgentError(f"refusing to run: {exc}") from exc
    report = Slots(cfg.state_dir / "bundles").recover(keys)
    return report if report.changed else None


def load_model(cfg: AgentConfig) -> Model:
    """Verify the configured bundle against the trusted keys, then build its sessions.

    The manifest's task chooses the runtime: a classifier's StagedModel, or a DetectorModel
    with this device's per-class thresholds (config detect.class_thresholds).
    """
    bundle = bundle_path(cfg)
    model: Model
    try:
        # Installed while its key was trusted: only a revocation makes it unfit to run.
        verified = verify_bundle(bundle, trust_store(cfg).unrevoked_keys())
        if verified.manifest.task == "detect":
            model = DetectorModel(
                verified,
                threads=cfg.model.threads,
                providers=cfg.model.providers,
                class_thresholds=cfg.detect.class_thresholds,
            )
        else:
            model = StagedModel(verified, threads=cfg.model.threads, providers=cfg.model.providers)
    except (BundleError, KeyFileError, RuntimeLoadError, OSError, ValueError) as exc:
        raise AgentError(f"refusing to run: {exc}") from exc
    try:
        seconds = model.warm_up(cfg.model.warmup_runs)
    except Exception as exc:  # onnxruntime's own untyped errors on a first run
        raise AgentError(f"refusing to run: {bundle}: the model's first run failed: {exc}") from exc
    m = model.manifest
    ms = seconds * 1e3
    log.info("model %s v%d from %s: warmed up in %.0f ms", m.model_id, m.version, bundle, ms)
    return model


def _gate(m: Manifest, point: int) -> Gate | None:
    """The motion gate of operating point `point`; None when the bundle has no points."""
    points = m.operating_points
    return points[point].gate if 0 <= point < len(points) else None


class Agent:
    """Everything one device runs; also the target of coordinator commands."""

    def __init__(self, cfg: AgentConfig, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        self.boot_id = str(uuid.uuid4())
        self.hardware = describe()
        self.notifier = Notifier.from_env()
        # Building sessions can take minutes (TensorRT engines on a Jetson): ask systemd for
        # the time instead of being killed by TimeoutStartSec half-way.
        self.notifier.extend_timeout(LOAD_TIMEOUT_S)
        recovered = recover_bundles(cfg)
        if recovered:
            log.warning("device %s: %s", cfg.device_id, recovered.summary())
        self.notifier.status(f"verifying and loading {bundle_path(cfg)}")
        self.model = load_model(cfg)
        m = self.model.manifest
        self.pre = Preprocessor(m.preprocessing, dtype=m.input.dtype)
        self.outbox = Outbox(
            cfg.state_dir / "outbox.db",
            max_messages=cfg.outbox.max_messages,
            max_bytes=cfg.outbox.max_bytes,
        )
        # The count already reported survives restarts with the drop counts themselves, so
        # drops a killed agent had not reported yet are reported by the next one.
        self.overflow_reporter = OverflowReporter(self.outbox.counter(OVERFLOW_REPORTED))
        n_points = max(1, len(m.operating_points))
        self.governor = Governor(cfg.governor, n_points, m.default_operating_point)
        self.operating_point = m.default_operating_point
        self.objects: DetectPipeline | None = self._pipeline(self.model)
        self._last_tracked: tuple[frozenset[int] | None, float] = (None, 0.0)
        self.interval_s = cfg.telemetry.interval_s
        self.slots = Slots(cfg.state_dir / "bundles")
        self.camera = Camera(cfg.camera, on_event=self.event)
        try:
            self.link = Link(
                cfg.device_id, cfg.group, cfg.mqtt, self.outbox, self.birth, self.event
            )
        except TlsSetupError as exc:
            raise AgentError(f"refusing to run: {exc}") from None
        self.commands = CommandHandler(cfg.device_id, self)
        self.trust = trust_store(cfg)
        self.link.on_keys = self._on_keys
        self.updates = UpdateManager(
            device_id=cfg.device_id,
            slots=self.slots,
            transfers_dir=cfg.state_dir / "transfers",
            cfg=cfg.update,
            model_cfg=cfg.model,
            link=self.link,
            tree=self.link.tree,
            keys=self.trust,
            installed_keys=self.trust.unrevoked_keys,
            device_class=device_class(self.hardware),
            event=self.event,
            running=self._running,
        )
        self.link.on_transfer = self.updates.on_transfer
        self._recovered = recovered
        self._setup_federated()
        self.power_reader = (
            detect(profile=cfg.power.profile, source=cfg.power.source)
            if cfg.power.source != "none"
            else None
        )
        self.power = PowerMeter(self.power_reader.name if self.power_reader else "none")
        self.thermal = detect_temperature()
        self.watchdog = WatchdogFeeder(self.notifier)
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # prime: the first call always returns 0
        self.last_frame: Frame | None = None
        self._last_result: tuple[int, float] = (-1, 0.0)
        self.frames_rejected = 0  # frames the camera delivered that preprocessing refused
        self._rejected_reported_at: float | None = None
        if cfg.model.operating_point is not None:
            try:
                self.set_operating_point(cfg.model.operating_point, pin=True, by="the config")
            except ValueError as exc:
                raise AgentError(f"refusing to run: model.operating_point: {exc}") from None

    def _pipeline(self, model: Model) -> DetectPipeline | None:
        """A detector's gate, zones and tracker; None for a classifier."""
        if not isinstance(model, DetectorModel):
            return None
        # Imported here: a classifier device never loads the tracking code.
        from edgefleet.agent.runtime.objects import DetectPipeline

        return DetectPipeline(model, self.cfg.detect, _gate(model.manifest, self.operating_point))

    def _setup_federated(self) -> None:
        """Probe schedule, supplied-labels folder and round worker, when federated is on."""
        fed = self.cfg.federated
        self.collector: FeatureCollector | None = None
        self.labels: LabelFolder | None = None
        self.fed_worker: FedWorker | None = None
        if not fed.enabled:
            return
        if isinstance(self.model, DetectorModel):
            # Rounds train classifier exit heads; a detector has none.
            log.warning(
                "device %s: federated is on, but a detector takes no part in rounds",
                self.cfg.device_id,
            )
            return
        sha = self.model.verified.manifest_sha256
        self.collector = FeatureCollector(
            fed.probe_every, fed.buffer_size, fed.supplied_buffer_size, sha
        )
        if fed.labels_dir is not None:
            m = self.model.manifest
            self.labels = LabelFolder(
                fed.labels_dir,
                labels=m.labels,
                preprocessing=m.preprocessing,
                dtype=m.input.dtype,
                bundle_sha256=sha,
                scan_s=fed.labels_scan_s,
                on_reject=self._label_rejected,
            )
        self.fed_worker = FedWorker(
            device_id=self.cfg.device_id,
            group=self.cfg.group,
            cfg=fed,
            tree=self.link.tree,
            state_dir=self.cfg.state_dir,
            collector=self.collector,
            running=self._running_bundle,
            publish=self.link.publish_fed_update,
            event=self.event,
        )
        self.link.on_fed_task = self.fed_worker.on_task

    def _running_bundle(self) -> RunningBundle:
        """What runs now, for the round worker's thread (one read of self.model)."""
        model = self.model
        m, v = model.manifest, model.verified
        assert isinstance(model, StagedModel), "rounds run only with a classifier"
        return RunningBundle(
            m.model_id, m.version, v.manifest_sha256, m, v.read, tuple(model.thresholds)
        )

    def _label_rejected(self, path: Path, why: str) -> None:
        """A supplied-label file that cannot be used (the scanner's thread): say which."""
        shown = str(path)
        self.event(
            "error",
            f"supplied label {shown} refused: {why}",
            {"reason": "label_rejected", "file": shown[-1000:], "why": why[:1000]},
        )

    # -- messages -----------------------------------------------------------------------

    def birth(self) -> Status:
        """The retained status published on every (re)connect."""
        m = self.model.manifest
        return Status(
            device_id=self.cfg.device_id,
            online=True,
            ts=time.time(),
            agent_version=__version__,
            model_id=m.model_id,
            model_version=m.version,
            operating_point=self.operating_point if m.operating_points else None,
            group=self.cfg.group,
            hardware=self.hardware,
            boot_id=self.boot_id,
            bundle_sha256=self.model.verified.manifest_sha256,
            previous_bundle_sha256=previous_manifest_sha256(self.slots),
        )

    def event(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        """Queue an event (QoS 1 through the outbox) with the next persisted event number."""
        level = (
            "error"
            if kind in ("error", "rollback")
            else "warning"
            if kind.endswith("lost") or kind in ("outbox_overflow", "keys_refused")
            else "info"
        )
        ev = Event(
            device_id=self.cfg.device_id,
            ts=time.time(),
            seq=self.outbox.next_seq("events"),
            kind=kind,
            level=level,
            message=message[:1000],
            details={
                k: v
                for k, v in (details or {}).items()
                if isinstance(v, (str, int, float, bool)) or v is None
            },
        )
        self.link.send("events", encode(ev))

    # -- command target -----------------------------------------------------------------

    def set_operating_point(
        self, index: int, pin: bool, by: str = "the coordinator"
    ) -> dict[str, JsonValue]:
        """Apply an operating point's thresholds (and pin it if asked); an event says so."""
        points = self.model.manifest.operating_points
        if not points:
            raise ValueError("this bundle has no operating points (no early exits)")
        if not 0 <= index < len(points):
            raise ValueError(f"operating point {index} does not exist (0..{len(points) - 1})")
        previous = self.operating_point
        # Both checks above passed, so nothing below can fail half-way.
        self.model.set_thresholds(points[index].thresholds)
        self.operating_point = index
        if self.objects is not None:
            self.objects.set_gate(points[index].gate)
        if pin:
            self.governor.pin(index)
        else:
            self.governor.current = index
        how = "pinned" if pin else "set"
        self.event(
            "operating_point_changed",
            f"{how} to {index} ({points[index].name}) by {by}",
            {"from": previous, "to": index, "pinned": pin},
        )
        return {"operating_point": index, "previous": previous, "pinned": pin}

    def unpin_operating_point(self) -> dict[str, JsonValue]:
        """Let the governor move again."""
        self.governor.unpin()
        return {"operating_point": self.operating_point, "pinned": False}

    def set_thresholds(self, thresholds: list[float | None]) -> dict[str, JsonValue]:
        """Override the exit thresholds until the next operating-point change."""
        self.model.set_thresholds(thresholds)
        return {"thresholds": list(thresholds)}

    def set_telemetry_interval(self, seconds: float) -> dict[str, JsonValue]:
        """Takes effect from the next window."""
        self.interval_s = seconds
        return {"interval_s": seconds}

    def snapshot_jpeg(self, quality: int) -> bytes:
        """The last processed frame as JPEG: the only way a frame leaves the device."""
        if self.last_frame is None:
            raise LookupError("no frame has been captured yet")
        ok, buf = cv2.imencode(".jpg", self.last_frame.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return bytes(buf)

    def _on_keys(self, payload: bytes) -> None:
        """A keys/trust document arrived (paho's thread): accept what verifies, report the rest."""
        topic = self.link.tree.keys_trust()
        doc = decode(KeyTrust, payload, topic=topic)
        if isinstance(doc, ProtocolError):
            log.error("device %s: key trust refused: %s", self.cfg.device_id, doc.message)
            self.event("keys_refused", f"key trust document refused: {doc.message}", {})
            return
        try:
            outcome = self.trust.apply(doc)
        except OSError as exc:
            log.error("device %s: cannot save the trust store: %s", self.cfg.device_id, exc)
            self.event("error", f"key trust not saved: {exc}", {"reason": "keys_not_saved"})
            return
        for s, why in outcome.refused:
            if self.trust.first_refusal(s):
                log.warning("device %s: key statement refused: %s", self.cfg.device_id, why)
                self.event(
                    "keys_refused",
                    why,
                    {"action": s.action, "key_id": s.key_id, "signer": s.signer},
                )
        trusted = ",".join(self.trust.trusted_ids())
        for s in outcome.accepted:
            message = f"key {s.key_id} {'trusted' if s.action == 'trust' else 'revoked'}"
            log.info(
                "device %s: %s (signed by %s); trusted now: %s",
                self.cfg.device_id,
                message,
                s.signer,
                trusted,
            )
            self.event(
                "keys_changed",
                message,
                {
                    "action": s.action,
                    "key_id": s.key_id,
                    "signer": s.signer,
                    "not_before": s.not_before,
                    "old_key_expires_at": s.old_key_expires_at,
                    "trusted": trusted,
                },
            )

    def _running(self) -> Running:
        m = self.model.manifest
        v = self.model.verified
        return Running(m.model_id, m.version, v.manifest_sha256, tuple(m.input.shape), v.path)

    def install_bundle(self, cmd: InstallBundle) -> dict[str, JsonValue]:
        """Start fetching, checking and switching to a pushed bundle (events tell how it goes)."""
        if not self.cfg.update.enabled:
            raise ValueError("updates are disabled on this device (update.enabled = false)")
        return self.updates.install(cmd)

    def rollback_bundle(self, cmd: RollbackBundle) -> dict[str, JsonValue]:
        """Go back to the previous bundle if cmd names the running one."""
        return self.updates.rollback(cmd)

    def reload_bundle(self) -> dict[str, JsonValue]:
        """Verify and load the bundle again; on failure the running model stays."""
        if self.updates.busy():
            raise RuntimeError("an install or rollback is in progress; reload refused")
        try:
            model = load_model(self.cfg)
        except AgentError as exc:
            raise RuntimeError(str(exc)) from None
        self._switch(model)
        m = model.manifest
        point = self.operating_point
        return {"model_id": m.model_id, "version": m.version, "operating_point": point}

    def _switch(self, model: Model) -> None:
        """Run model from the next frame on: its governor, thresholds and preprocessing.

        A detector's live tracks end here (object_end events): the next model's track ids
        and classes need not mean the same.
        """
        self._flush_objects()
        m = model.manifest
        index = min(self.operating_point, max(0, len(m.operating_points) - 1))
        # The governor walks the new bundle's points: its count and default, the same
        # latency target, the pin kept (clamped to a point that exists).
        n_points = max(1, len(m.operating_points))
        governor = Governor(self.cfg.governor, n_points, m.default_operating_point)
        governor.set_target(self.governor.target_ms)
        if self.governor.pinned:
            governor.pin(index)
        else:
            governor.current = index
        if m.operating_points:
            model.set_thresholds(m.operating_points[index].thresholds)
        self.model, self.governor, self.operating_point = model, governor, index
        self.pre = Preprocessor(m.preprocessing, dtype=m.input.dtype)
        self.objects = self._pipeline(model)
        self._last_tracked = (None, 0.0)
        sha = model.verified.manifest_sha256
        if self.collector is not None:
            self.collector.reset(sha)
        if self.labels is not None:
            self.labels.set_model(m.labels, m.preprocessing, m.input.dtype, sha)

    def _maybe_swap(self) -> bool:
        """Take over a model the update manager has checked; True when one was swapped in."""
        swap = self.updates.take_swap()
        if swap is None:
            return False
        t0 = time.perf_counter()
        model: Model = swap.model
        if isinstance(model, DetectorModel):
            # The health check built and checked it with the bundle's own thresholds (its
            # golden boxes were recorded with them); this device's apply from now on.
            try:
                model.set_class_thresholds(self.cfg.detect.class_thresholds)
            except ValueError as exc:
                # A new bundle without a label the config names: run it at its own
                # thresholds rather than refuse a bundle the health check passed.
                self.event(
                    "config_rejected",
                    f"detect.class_thresholds do not fit the new bundle: {exc}",
                    {"reason": "class_thresholds", "model_id": swap.verified.manifest.model_id},
                )
        self._switch(model)
        swap_ms = (time.perf_counter() - t0) * 1e3
        self.link.republish_birth()
        self.updates.swapped(swap, swap_ms)
        return True

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Infer until stopped; returns the process exit status."""
        m = self.model.manifest
        self.camera.start()
        if self.fed_worker is not None:
            self.fed_worker.start()
        if self.labels is not None:
            self.labels.start()
        self.link.start()
        self.event("started", f"agent {__version__} running {m.model_id} v{m.version}")
        if self._recovered:
            r = self._recovered
            # "rollback" only when the running version went back; a half download swept
            # away or a trial kept is install news, not a rollback.
            went_back = bool(r.fell_back or r.trial_rolled_back)
            self.event(
                "rollback" if went_back else "install_progress",
                r.summary(),
                {"reason": "recovered_at_start", "rolled_back": went_back},
            )
        window = self._new_window()
        window_t0 = time.monotonic()
        next_power = next_overflow_check = 0.0
        ready = False
        next_extend = 0.0
        while not self.stop.is_set():
            frame = self.camera.latest(timeout=0.5)
            now = time.monotonic()
            if not ready and now >= next_extend:
                # No frame yet (a camera missing at boot): stay "activating" with the reason
                # on `systemctl status`, rather than be killed by TimeoutStartSec and
                # restarted every two minutes; telemetry and commands work meanwhile.
                why = self.camera.stats.last_error
                self.notifier.extend_timeout(FIRST_FRAME_EXTEND_S)
                self.notifier.status(f"waiting for camera {self.camera.name}: {why or 'opening'}")
                next_extend = now + FIRST_FRAME_EXTEND_S / 3
            # The loop is alive (frames or not): a hung inference stops this, camera loss does not.
            self.watchdog.progress()
            self.watchdog.maybe_feed()
            self._maybe_swap()
            if self._reshape_window(window):
                window = self._new_window()
            if frame is not None:
                self._infer(frame, window)
                if not ready:
                    self.notifier.ready(f"running {m.model_id} v{m.version}")
                    ready = True
            self._handle_commands()
            self._take_label()
            if now >= next_power and self.power_reader is not None:
                self.power.add(self.power_reader.sample())
                next_power = now + 1.0
            if now >= next_overflow_check:
                self._report_overflow(now)
                next_overflow_check = now + 1.0
            if now - window_t0 >= self.interval_s:
                self._close_window(window, now - window_t0)
                window_t0 = now
        return self.shutdown(window, time.monotonic() - window_t0)

    def _new_window(self) -> TelemetryWindow:
        return TelemetryWindow(
            len(self.model.early_exits) + 1,
            len(self.model.manifest.stages),
            time.time(),
            captured_total=self.camera.stats.captured,
            dropped_total=self.camera.stats.dropped,
            detector=self.objects is not None,
        )

    def _reshape_window(self, window: TelemetryWindow) -> bool:
        """A reloaded bundle with other stages or exits needs a window of its shape."""
        return (
            window.n_exits != len(self.model.early_exits) + 1
            or window.n_stages != len(self.model.manifest.stages)
            or window.detector != (self.objects is not None)
        )

    def _infer(self, frame: Frame, window: TelemetryWindow) -> None:
        if self.objects is not None:
            self._detect(frame, window, self.objects)
            return
        t0 = time.perf_counter()
        collector = self.collector
        assert isinstance(self.model, StagedModel)
        try:
            if collector is not None and self.model.early_exits and collector.due():
                # Full depth for a federated round: counted, published and timed as what
                # it is, an answer of the final head.
                probe = self.model.probe_frame(frame.image, self.pre)
                pred = probe.prediction
                collector.add_probe(probe)
            else:
                pred = self.model.predict_frame(frame.image, self.pre)
        except FrameError as exc:
            self._reject_frame(exc)
            return
        latency = (time.perf_counter() - t0) * 1000.0
        self._rejected_reported_at = None  # the next bad frame starts a new report
        window.record(latency, pred.stage_ms, pred.exit_index)
        self.updates.frame_done()
        self.last_frame = frame
        self._maybe_result(frame, pred.class_index, pred.confidence, pred.exit_index, latency)

    def _detect(self, frame: Frame, window: TelemetryWindow, objects: DetectPipeline) -> None:
        """One frame of a detector: gate, model, zones, tracker; events and boxes out."""
        t0 = time.perf_counter()
        try:
            step = objects.step(frame.image, frame.ts, self.pre, frame.index)
        except FrameError as exc:
            self._reject_frame(exc)
            return
        except DecodeError as exc:
            # The bundle's outputs do not match its declaration: counted and reported like a
            # frame the model cannot take, rate-limited; the loop goes on.
            self._reject_frame(exc, what="detector output", reason="detector_output_rejected")
            return
        self.last_frame = frame
        if not step.ran:
            window.record_skipped()
            return
        latency = (time.perf_counter() - t0) * 1000.0
        self._rejected_reported_at = None
        window.record(latency, step.stage_ms, 0)
        window.record_objects(step.counts, step.started)
        self.updates.frame_done()
        for ev in step.events:
            self.event(ev.kind, ev.message, dict(ev.details))
        self._maybe_detect_result(frame, step, latency)

    def _maybe_detect_result(self, frame: Frame, step: Step, ms: float) -> None:
        """A result with boxes: rate-limited; on_change when the tracked objects change."""
        mode = self.cfg.telemetry.results
        if mode == "off":
            return
        last_ids, last_ts = self._last_tracked
        now = time.monotonic()
        if now - last_ts < 1.0 / self.cfg.telemetry.results_max_hz:
            return
        if mode == "on_change" and step.tracked == last_ids:
            return
        self._last_tracked = (step.tracked, now)
        best = step.objects[0] if step.objects else None
        result = Result(
            device_id=self.cfg.device_id,
            ts=frame.ts,
            frame_index=frame.index,
            class_index=best.class_index if best else 0,
            label=best.label if best else "",
            confidence=best.score if best else 0.0,
            exit_index=0,
            latency_ms=ms,
            objects=step.objects,
        )
        self.link.publish_result(encode(result))

    def _flush_objects(self) -> None:
        """End the live tracks of a detector (model switch, shutdown) with object_end events."""
        if self.objects is None:
            return
        for ev in self.objects.flush(time.time()):
            self.event(ev.kind, ev.message, dict(ev.details))

    def _take_label(self) -> None:
        """Probe one supplied-label image the scanner has ready (the model is the loop's)."""
        if self.labels is None or self.collector is None:
            return
        item = self.labels.take()
        if item is None:
            return
        if item.bundle_sha256 != self.model.verified.manifest_sha256:
            self.labels.finish(item, retry=True)  # made for the previous model: read again
            return
        try:
            assert isinstance(self.model, StagedModel)  # no collector runs with a detector
            probe = self.model.probe(item.tensor)
        except Exception as exc:  # onnxruntime's untyped errors: this image, not the loop
            self.labels.finish(item, error=f"the model could not run it: {exc}")
            return
        self.collector.add_supplied(probe, item.class_index)
        self.labels.finish(item)

    def _reject_frame(
        self, exc: ValueError, what: str = "frame", reason: str = "frame_rejected"
    ) -> None:
        """A frame the model cannot take (a camera switched mode, a broken decoder): skip it.

        Logged and reported as an event at the first bad frame of a run, then at most once a
        minute with the running count, so a camera stuck in a wrong mode cannot flood the
        outbox; the loop goes on with the next frame.
        """
        self.frames_rejected += 1
        now = time.monotonic()
        last = self._rejected_reported_at
        if last is not None and now - last < 60.0:
            return
        self._rejected_reported_at = now
        message = f"camera {self.camera.name}: {what} rejected: {exc}"
        log.warning("%s (%d so far)", message, self.frames_rejected)
        self.event(
            "error",
            message,
            {"reason": reason, "frames_rejected": self.frames_rejected},
        )

    def _maybe_result(
        self, frame: Frame, cls: int, conf: float, exit_index: int, ms: float
    ) -> None:
        mode = self.cfg.telemetry.results
        if mode == "off":
            return
        last_cls, last_ts = self._last_result
        now = time.monotonic()
        if now - last_ts < 1.0 / self.cfg.telemetry.results_max_hz:
            return
        if mode == "on_change" and cls == last_cls:
            return
        self._last_result = (cls, now)
        result = Result(
            device_id=self.cfg.device_id,
            ts=frame.ts,
            frame_index=frame.index,
            class_index=cls,
            label=self.model.manifest.labels[cls][:128],
            confidence=min(1.0, max(0.0, conf)),
            exit_index=exit_index,
            latency_ms=ms,
        )
        self.link.publish_result(encode(result))

    def _report_overflow(self, now: float) -> None:
        """An `outbox_overflow` event for drops not yet reported, as the rate limit allows."""
        report = self.overflow_reporter.check(self.outbox.overflow().by_kind, now)
        if report is None:
            return
        log.warning("device %s: %s", self.cfg.device_id, report.message)
        # Counted as reported before the event is queued: the event itself may make the
        # outbox drop a window, which the next report then covers.
        self.outbox.raise_counter(OVERFLOW_REPORTED, self.overflow_reporter.reported_total)
        self.event("outbox_overflow", report.message, dict(report.details))

    def _handle_commands(self) -> None:
        while True:
            try:
                topic, payload, retained = self.link.commands.get_nowait()
            except Exception:  # queue.Empty
                return
            if retained:
                line = self.commands.ignore_retained(topic, payload)
                if line is not None:
                    details = {"reason": "retained_command", "topic": topic[:1000]}
                    self.event("error", line, {**details, "ignored": self.commands.retained})
                continue
            _reply, data = self.commands.answer(topic, payload)
            self.link.send("reply", data)

    def _close_window(self, window: TelemetryWindow, elapsed: float) -> None:
        stats = window.close(
            time.time(),
            captured=self.camera.stats.captured,
            dropped=self.camera.stats.dropped,
            elapsed_s=elapsed,
        )
        power = self.power.close(stats.frames_processed, elapsed)
        thermal = self.thermal.sample()
        m = self.model.manifest
        telemetry = Telemetry(
            device_id=self.cfg.device_id,
            seq=self.outbox.next_seq("telemetry"),
            **stats.telemetry_fields(),
            operating_point=self.operating_point,
            cpu_percent=self.process.cpu_percent(None),
            rss_mb=self.process.memory_info().rss / 2**20,
            temperature_c=thermal.temperature_c,
            throttled=thermal.throttled,
            power_w=power.power_w,
            power_source=power.source if power.power_w is not None else "none",
            energy_per_frame_mj=power.energy_per_frame_mj,
            outbox_depth=self.outbox.depth(),
            # Windows dropped over the outbox file's life, persisted like seq: what the
            # coordinator needs to tell dropped windows from lost ones.
            outbox_overflow=self.outbox.overflow().by_kind.get("telemetry", 0),
            model_id=m.model_id,
            model_version=m.version,
        )
        self.link.send("telemetry", encode(telemetry))
        move = self.governor.update(
            stats.latency_ms.p95 if stats.frames_processed else None,
            thermal.temperature_c,
            thermal.throttled,
        )
        if move is not None and m.operating_points:
            self.model.set_thresholds(m.operating_points[move.to_index].thresholds)
            self.operating_point = move.to_index
            if self.objects is not None:
                self.objects.set_gate(m.operating_points[move.to_index].gate)
            self.event(
                "operating_point_changed",
                move.reason,
                {"from": move.from_index, "to": move.to_index},
            )

    def shutdown(self, window: TelemetryWindow, elapsed: float) -> int:
        """Final window into the outbox, offline status, everything closed.

        What must not be lost goes first: the last window and the `stopping` event are
        committed to the on-disk outbox before anything waits on the camera or the network.
        The waits then share one budget, so the process ends within SHUTDOWN_BUDGET_S of
        SIGTERM whatever the broker or the camera do (systemd's TimeoutStopSec is 10 s).
        """
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        self.notifier.stopping()
        self._flush_objects()
        self._close_window(window, max(elapsed, 1e-3))
        self.event("stopping", "agent stopping (SIGTERM)")

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        self.updates.stop(timeout=min(0.5, left()))
        if self.fed_worker is not None:
            self.fed_worker.stop(timeout=min(0.5, left()))
        if self.labels is not None:
            self.labels.stop(timeout=min(0.5, left()))
        self.camera.stop(timeout=min(1.0, left()))
        self.link.stop(timeout=left() / 2)  # it may wait twice: the offline status, the drain
        self.outbox.close()
        return EXIT_OK
