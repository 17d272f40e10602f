"""One install or rollback at a time, from command to hot swap, with an event per state.

The inference loop never waits here. `install` and `rollback` are called from the loop (they
only check the command and start a job); the job runs in its own thread:

    downloading -> verifying -> health_checking -> (loop swaps the model) -> active
                                                  \\-> failed            \\-> rolled_back

Downloading, unpacking and verifying run in a thread at a lower CPU priority (nice +10) so the
loop keeps its frame rate on a two-core device. Building the new sessions and the health check
run at normal priority: onnxruntime's intra-op threads inherit their creator's priority and
would otherwise run every later inference at +10 (a niced thread cannot lower its nice again
without CAP_SYS_NICE). The checked sessions are the ones swapped in: nothing is built twice.

Before the loop swaps, `current` already points at the new bundle (Slots.activate, with a
journal): a crash from then on restarts on a bundle that passed its health check. After
`confirm_frames` frames on the new model the trial is confirmed and `installed` is reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import JsonValue

from edgefleet.agent.bundle import MANIFEST_NAME, BundleError, VerifiedBundle, verify_bundle
from edgefleet.agent.config import ModelConfig, UpdateConfig
from edgefleet.agent.protocol import InstallBundle, RollbackBundle, TopicTree
from edgefleet.agent.update.chunks import ChunkStore, TransferError
from edgefleet.agent.update.fetch import Download, Expect, TransferCancelled, TransferLink
from edgefleet.agent.update.health import HealthReport, Model, build_model, check_health
from edgefleet.agent.update.report import (
    EventSink,
    InstallRefused,
    InstallReporter,
    InstallState,
)
from edgefleet.agent.update.slots import Slots
from edgefleet.agent.update.stage import stage_archive, stage_dir

log = logging.getLogger(__name__)

LOW_PRIORITY_NICE = 10
PROGRESS_EVERY_S = 2.0  # at most one downloading event per this many seconds (plus the last)


@dataclass(frozen=True)
class Running:
    """What the loop runs now, as the manager needs to know it."""

    model_id: str
    version: int
    manifest_sha256: str
    input_shape: tuple[int | str, ...]
    path: Path


@dataclass
class Swap:
    """A checked model for the loop to take over between two frames."""

    verified: VerifiedBundle
    model: Model  # a StagedModel, or a DetectorModel for a detect bundle
    why: Literal["install", "rollback"]
    rollout_id: str | None
    from_version: int
    health: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    kind: Literal["install", "rollback"]
    manifest_sha256: str
    rollout_id: str | None
    archive_sha256: str | None = None
    version: int | None = None
    state: str = "starting"
    have: int = 0
    total: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    transfer: dict[str, Any] = field(default_factory=dict)


def same_input(a: tuple[int | str, ...], b: tuple[int | str, ...]) -> bool:
    """Whether two input shapes take the same frames: same rank, and every dimension equal
    where both are fixed (a symbolic batch 'N' and a fixed batch of 1 are the same input)."""
    if len(a) != len(b):
        return False
    return all(
        x == y or isinstance(x, str) or isinstance(y, str) for x, y in zip(a, b, strict=True)
    )


def previous_manifest_sha256(slots: Slots) -> str | None:
    """Manifest sha256 of the bundle a rollback would return to (None: there is none)."""
    previous = slots.previous()
    if previous is None:
        return None
    try:
        return hashlib.sha256((previous / MANIFEST_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


def _lower_priority() -> None:
    """Nice the calling thread only (Linux: a thread is a task with its own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY_NICE)
    except (OSError, AttributeError):  # not Linux, or not allowed: run at normal priority
        log.debug("could not lower the update thread's priority")


class UpdateManager:
    """Runs install and rollback jobs for one agent; the loop polls `take_swap`."""

    def __init__(
        self,
        *,
        device_id: str,
        slots: Slots,
        transfers_dir: Path,
        cfg: UpdateConfig,
        model_cfg: ModelConfig,
        link: TransferLink,
        tree: TopicTree,
        keys: list[Ed25519PublicKey] | Callable[[], list[Ed25519PublicKey]],
        device_class: str,
        event: EventSink,
        running: Callable[[], Running],
        installed_keys: Callable[[], list[Ed25519PublicKey]] | None = None,
    ) -> None:
        self.device_id = device_id
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.link = link
        self.tree = tree
        # A callable (the agent's TrustStore) is asked at each verification: keys rotate.
        self._keys = keys
        # Bundles already on the device (the running one, a rollback's target) were checked
        # when installed: they need a key not revoked, not one still inside its overlap.
        self._installed_keys = installed_keys
        self.device_class = device_class
        self.event = event
        # Looked up at each event: a test may replace self.event after construction.
        self._reports = InstallReporter(device_id, lambda k, m, d: self.event(k, m, d))
        self.running = running
        self.slots = slots
        self.transfers_dir = transfers_dir
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._download: Download | None = None
        self._swaps: queue.Queue[Swap] = queue.Queue(maxsize=1)
        self._trial: Swap | None = None
        self._trial_frames = 0
        self._trial_t0 = 0.0
        # A trial that survived a restart (Slots.recover kept it) is confirmed after
        # confirm_frames frames too: left on trial, the next crashes would roll back a
        # version that had been running fine (MAX_TRIAL_STARTS).
        self._resumed_trial = slots.trial() is not None

    @property
    def keys(self) -> list[Ed25519PublicKey]:
        """The keys a bundle may be signed with now."""
        return list(self._keys()) if callable(self._keys) else list(self._keys)

    @property
    def installed_keys(self) -> list[Ed25519PublicKey]:
        """The keys a bundle already installed here may be signed with."""
        return self.keys if self._installed_keys is None else self._installed_keys()

    # -- commands (called from the loop) --------------------------------------------------

    def install(self, cmd: InstallBundle) -> dict[str, JsonValue]:
        """Accept an install (starting its job) or refuse it; never blocks on the work."""
        now = self.running()
        if cmd.manifest_sha256 == now.manifest_sha256:
            return {"state": "active", "manifest_sha256": now.manifest_sha256, "already": True}
        with self._lock:
            job = self._job
            if job is not None and job.thread is not None and job.thread.is_alive():
                if job.kind == "install" and job.manifest_sha256 == cmd.manifest_sha256:
                    return {"state": job.state, "have": job.have, "total": job.total}
                raise self._refuse(
                    cmd,
                    f"busy: {job.kind} of {job.manifest_sha256[:12]} is {job.state}",
                    "busy",
                )
            if self._trial is not None:
                raise self._refuse(cmd, "busy: the last installed bundle is still on trial", "busy")
            if cmd.model_id != now.model_id and not cmd.allow_model_change:
                raise self._refuse(
                    cmd,
                    f"bundle is for model {cmd.model_id!r}, this device runs {now.model_id!r} "
                    "(allow_model_change not set)",
                    "other_model",
                )
            job = _Job(
                "install",
                cmd.manifest_sha256,
                cmd.rollout_id,
                archive_sha256=cmd.sha256,
                version=cmd.version,
            )
            job.thread = threading.Thread(
                target=self._install_job, args=(job, cmd), name="update-install", daemon=True
            )
            self._job = job
        job.thread.start()
        return {"state": "accepted", "manifest_sha256": cmd.manifest_sha256}

    def rollback(self, cmd: RollbackBundle) -> dict[str, JsonValue]:
        """Go back to the previous bundle if the one named runs now (idempotent)."""
        now = self.running()
        if now.manifest_sha256 != cmd.manifest_sha256:
            return {"rolled_back": False, "running": now.manifest_sha256}
        previous = self.slots.previous()
        if previous is None:
            raise ValueError("no previous bundle is installed to roll back to")
        self._resumed_trial = False  # the rollback ends that trial
        with self._lock:
            job = self._job
            if job is not None and job.thread is not None and job.thread.is_alive():
                job.cancel.set()  # an install still running for this rollout is abandoned
            job = _Job("rollback", cmd.manifest_sha256, cmd.rollout_id)
            job.thread = threading.Thread(
                target=self._rollback_job,
                args=(job, cmd.reason or "asked by the coordinator"),
                name="update-rollback",
                daemon=True,
            )
            self._job = job
        job.thread.start()
        return {"rolled_back": True, "to": previous.name}

    def on_transfer(self, topic: str, payload: bytes) -> None:
        """Messages under bundle/ (paho's thread): handed to the running download, if any."""
        download = self._download
        if download is not None:
            download.on_message(topic, payload)

    # -- the loop's side --------------------------------------------------------------------

    def take_swap(self) -> Swap | None:
        """A checked model to switch to now, if one is ready."""
        try:
            return self._swaps.get_nowait()
        except queue.Empty:
            return None

    def swapped(self, swap: Swap, swap_ms: float) -> None:
        """The loop runs swap.model from now on; an install is on trial until confirmed."""
        m = swap.verified.manifest
        if swap.why == "rollback":
            self._report(
                "rolled_back",
                f"rolled back to {m.model_id} v{m.version} ({swap.health.get('reason', '')})",
                swap.rollout_id,
                swap.verified.manifest_sha256,
                version=m.version,
                from_version=swap.from_version,
                swap_ms=round(swap_ms, 3),
            )
            self._finish()
            return
        swap.health["swap_ms"] = round(swap_ms, 3)
        self._trial, self._trial_frames, self._trial_t0 = swap, 0, time.monotonic()
        if self.cfg.confirm_frames == 0:
            self._confirm()

    def frame_done(self) -> None:
        """One more frame ran on the model in trial; confirm it after enough of them."""
        if self._trial is None:
            if self._resumed_trial:
                self._confirm_resumed()
            return
        self._trial_frames += 1
        if self._trial_frames >= self.cfg.confirm_frames:
            self._confirm()

    def _confirm_resumed(self) -> None:
        self._trial_frames += 1
        if self._trial_frames < self.cfg.confirm_frames:
            return
        self._resumed_trial = False
        self.slots.confirm()
        now = self.running()
        self._report(
            "active",
            f"installed {now.model_id} v{now.version}: its trial, interrupted by a restart, "
            f"is confirmed after {self._trial_frames} frames",
            None,
            now.manifest_sha256,
            version=now.version,
            frames=self._trial_frames,
        )
        self._trial_frames = 0

    def _confirm(self) -> None:
        swap = self._trial
        if swap is None:
            return
        self._trial = None
        self.slots.confirm()
        m = swap.verified.manifest
        self._report(
            "active",
            f"installed {m.model_id} v{m.version} (was v{swap.from_version}); "
            f"{self._trial_frames} frames ran on it",
            swap.rollout_id,
            swap.verified.manifest_sha256,
            version=m.version,
            from_version=swap.from_version,
            frames=self._trial_frames,
            **{k: v for k, v in swap.health.items() if isinstance(v, (int, float, str, bool))},
        )
        self._finish()
        self._cleanup()

    def stop(self, timeout: float = 1.0) -> None:
        """Abandon any job; partial downloads stay on disk and resume at the next install."""
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join(timeout)

    def busy(self) -> bool:
        """Whether a job runs or an install is on trial."""
        with self._lock:
            job = self._job
        alive = job is not None and job.thread is not None and job.thread.is_alive()
        return alive or self._trial is not None

    # -- jobs (their own threads) -------------------------------------------------------------

    def _install_job(self, job: _Job, cmd: InstallBundle) -> None:
        try:
            verified = self._fetch_and_stage(job, cmd)
            if verified is None:
                return  # cancelled
            self._check_and_offer(job, cmd, verified)
        except Exception as exc:  # every failure ends as one event; the old model keeps running
            log.exception("device %s: install of %s failed", self.device_id, cmd.sha256[:12])
            self._report(
                "failed",
                f"install of {cmd.model_id} v{cmd.version} failed: {exc}",
                cmd.rollout_id,
                cmd.manifest_sha256,
                version=cmd.version,
                reason=str(exc)[:900],
            )
            self._finish()

    def _fetch_and_stage(self, job: _Job, cmd: InstallBundle) -> VerifiedBundle | None:
        """Download and stage in a low-priority thread; the verified, installed bundle."""
        box: dict[str, Any] = {}

        def work() -> None:
            _lower_priority()
            try:
                box["verified"] = self._download_and_stage(job, cmd)
            except BaseException as exc:  # re-raised in the job thread
                box["error"] = exc

        worker = threading.Thread(target=work, name="update-fetch", daemon=True)
        worker.start()
        worker.join()
        error = box.get("error")
        if isinstance(error, TransferCancelled):
            log.info("device %s: install of %s cancelled", self.device_id, cmd.sha256[:12])
            self._finish()
            return None
        if error is not None:
            raise error
        verified: VerifiedBundle = box["verified"]
        return verified

    def _download_and_stage(self, job: _Job, cmd: InstallBundle) -> VerifiedBundle:
        installed = {b.manifest_sha256: b.path for b in self.slots.installed()}
        if cmd.manifest_sha256 in installed:
            # Already on disk (a rollback's target, an interrupted install): verify it again.
            self._set(job, "verifying", cmd, "already on disk; verifying")
            return verify_bundle(installed[cmd.manifest_sha256], self.installed_keys)
        # The running bundle is a delta base too, also when it is still the configured one
        # (model.bundle, not yet under bundles/): a device's first install can be a delta.
        bases = dict(installed)
        running = self.running()
        bases.setdefault(running.manifest_sha256, running.path)
        use_delta = cmd.delta is not None and cmd.delta.base_manifest_sha256 in bases
        expect = Expect(
            sha256=cmd.delta.sha256 if use_delta and cmd.delta else cmd.sha256,
            model_id=cmd.model_id,
            version=cmd.version,
            manifest_sha256=cmd.manifest_sha256,
            kind="delta" if use_delta else "full",
            base_manifest_sha256=cmd.delta.base_manifest_sha256
            if use_delta and cmd.delta
            else None,
        )
        self.slots.prune(self.cfg.disk_budget_bytes)
        last = [0.0]

        def progress(have: int, total: int) -> None:
            job.have, job.total = have, total
            now = time.monotonic()
            if have == total or now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                self._set(job, "downloading", cmd, f"{have}/{total} chunks", have=have, total=total)

        kind = "delta" if use_delta else "full bundle"
        self._set(job, "downloading", cmd, f"fetching the {kind} {expect.sha256[:12]}")
        download = Download(
            self.link,
            self.tree,
            self.transfers_dir,
            expect,
            window=self.cfg.window,
            rerequest_s=self.cfg.rerequest_s,
            give_up_s=self.cfg.give_up_s,
            max_bytes=self.cfg.disk_budget_bytes,
            on_progress=progress,
        )
        self._download = download
        try:
            archive = download.run(job.cancel)
        finally:
            self._download = None
            st = download.stats
            # Reported with the outcome: what this device took from the broker for it.
            job.transfer = {
                "transfer": expect.kind,
                "chunks_received": st.chunks_received,
                "chunks_written": st.chunks_written,
                "duplicates": st.duplicates,
                "bad_chunks": st.bad_chunks,
                "rerequests": st.rerequests,
            }
        self._set(job, "verifying", cmd, "checking hashes and signature")
        sources = list(bases.values()) if use_delta else []
        verified = stage_archive(
            archive,
            self.slots,
            sources,
            self.keys,
            expect_manifest_sha256=cmd.manifest_sha256,
        )
        ChunkStore.discard(self.transfers_dir, expect.sha256)
        m = verified.manifest
        if (m.model_id, m.version) != (cmd.model_id, cmd.version):
            raise BundleError(
                verified.path,
                f"holds {m.model_id} v{m.version}, the command says {cmd.model_id} v{cmd.version}",
            )
        shape = tuple(m.input.shape)
        now = self.running()
        if not same_input(shape, now.input_shape) and not cmd.allow_model_change:
            raise BundleError(
                verified.path,
                f"input shape {list(shape)} differs from the running model's "
                f"{list(now.input_shape)} (allow_model_change not set)",
            )
        return verified

    def _check_and_offer(self, job: _Job, cmd: InstallBundle, verified: VerifiedBundle) -> None:
        self._set(job, "health_checking", cmd, "loading and running the golden inputs")
        report = self._health(verified)
        if not report.ok or report.model is None:
            self.slots.mark_bad(verified.manifest_sha256, report.reason)
            raise BundleError(verified.path, f"health check failed: {report.reason}")
        if job.cancel.is_set():
            self._finish()
            return
        from_version = self.running().version
        self._adopt_running()
        self.slots.activate(verified.path)
        health = {**report.checks, **job.transfer}
        self._swaps.put(
            Swap(verified, report.model, "install", cmd.rollout_id, from_version, health)
        )

    def _adopt_running(self) -> None:
        """A device still on its configured bundle (model.bundle) gets it copied under
        bundles/ as `current` first, so that the install leaves a `previous` to roll back to
        whatever happens to the configured directory."""
        if self.slots.current() is not None:
            return
        src = self.running().path
        kept = stage_dir(src, slots=self.slots, trusted_keys=self.installed_keys)
        self.slots.activate(kept.path, trial=False)
        log.info("device %s: running bundle %s kept as %s", self.device_id, src, kept.path)

    def _health(self, verified: VerifiedBundle) -> HealthReport:
        return check_health(
            verified,
            threads=self.model_cfg.threads,
            providers=list(self.model_cfg.providers),
            device_class=self.device_class,
        )

    def _rollback_job(self, job: _Job, reason: str) -> None:
        try:
            previous = self.slots.previous()
            if previous is None:
                raise BundleError(self.slots.root, "no previous bundle to roll back to")
            verified = verify_bundle(previous, self.installed_keys)
            model = build_model(
                verified, threads=self.model_cfg.threads, providers=self.model_cfg.providers
            )
            model.warm_up(1)
            from_version = self.running().version
            self.slots.rollback(reason)
            self._swaps.put(
                Swap(verified, model, "rollback", job.rollout_id, from_version, {"reason": reason})
            )
        except Exception as exc:
            log.exception("device %s: rollback failed", self.device_id)
            self._report(
                "failed",
                f"rollback failed: {exc}",
                job.rollout_id,
                job.manifest_sha256,
                reason=str(exc)[:900],
            )
            self._finish()

    # -- bookkeeping ------------------------------------------------------------------------

    def _set(
        self, job: _Job, state: InstallState, cmd: InstallBundle, message: str, **details: Any
    ) -> None:
        job.state = state
        self._reports.step(state, cmd, message, job.archive_sha256, **details)

    def _report(
        self,
        state: InstallState,
        message: str,
        rollout_id: str | None,
        manifest_sha256: str,
        **details: Any,
    ) -> None:
        self._reports.report(state, message, rollout_id, manifest_sha256, **details)

    def _refuse(self, cmd: InstallBundle, why: str, reason: str) -> InstallRefused:
        return self._reports.refuse(cmd, why, reason)

    def _finish(self) -> None:
        with self._lock:
            self._job = None

    def _cleanup(self) -> None:
        """Keep the disk budget: old versions (never current or previous) and stale partials."""
        try:
            self.slots.prune(self.cfg.disk_budget_bytes)
            ChunkStore.prune(self.transfers_dir, keep=set(), max_age_s=7 * 86400)
        except OSError as exc:
            log.warning("device %s: pruning %s failed: %s", self.device_id, self.slots.root, exc)
        if not any(self.transfers_dir.iterdir()) if self.transfers_dir.is_dir() else False:
            shutil.rmtree(self.transfers_dir, ignore_errors=True)


__all__ = ["InstallRefused", "Running", "Swap", "TransferError", "UpdateManager"]
