"""Build jobs: `edgefleet optimize` runs of the coordinator, from queued to a variant.

submit() queues a build (the store allows one open job per model: JobConflict); the
JobRunner's worker takes queued jobs oldest first and runs each as a child process
(`python -m edgefleet.server.catalogue.child PID optimize ...`, the real CLI) in its own
process group, its output streamed to jobs/JOB/build.log and its [k/7] lines into the job's
step and progress. A build that succeeds is stored in the archive store and registered as a
variant, in that order and last of all; the job's state says succeeded only then.

What a crash leaves: a job killed at any moment leaves no variant (registration is the last
step) and no work files (the optimizer writes into jobs/JOB/work, removed when a job ends for
any reason, and by recover() for a job a dead coordinator left running). recover(), run once
before the worker starts, marks such jobs failed ("coordinator stopped during the build"),
kills a build process that outlived its coordinator and removes its files. Queued jobs stay
queued: they never started, and the new worker runs them in order. The archive of a build
killed between storing it and registering it stays in the archive store unused; its version
number is skipped by the next build, which is all that matters to devices.

One coordinator should run the builds of one catalogue (recover() takes every running job
for its own dead one's).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from edgefleet.agent.bundle import verify_bundle
from edgefleet.agent.durable import write_atomic
from edgefleet.server.catalogue.buildlog import Progress
from edgefleet.server.catalogue.errors import NotPossible, UnknownJob
from edgefleet.server.catalogue.files import CatalogueFiles
from edgefleet.server.catalogue.models import model_id_of, model_options, need_model
from edgefleet.server.catalogue.options import BuildOptions, optimize_args
from edgefleet.server.catalogue.process import follow, kill_group, kill_leftover, spawn
from edgefleet.server.catalogue.variants import next_version, variant_from_report
from edgefleet.server.fleet.store.catalogue_base import (
    OPEN_JOB_STATES,
    BuildJobRecord,
    CatalogueStore,
    JobOrigin,
    ModelRecord,
)
from edgefleet.server.keystore import PRIVATE_NAME
from edgefleet.server.rollout.archives import ArchiveStore

log = logging.getLogger(__name__)

STOPPED = "coordinator stopped during the build"
CANCELLED = "cancelled by the operator"


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def submit(
    store: CatalogueStore, model: str, options: BuildOptions, origin: JobOrigin
) -> BuildJobRecord:
    """Queue a build of a catalogue model; the runner picks it up within its poll interval.

    The options are laid over those the model was added with (its preprocessing...), and the
    job keeps the result. UnknownModel for a name not in the catalogue; JobConflict
    (store/errors.py) when the model already has a job queued or running.
    """
    record = need_model(store, model)
    effective = options.over(model_options(record).build_defaults())
    now = time.time()
    job_id = new_job_id()
    job = BuildJobRecord(
        job_id=job_id,
        model=model,
        origin=origin,
        options_json=effective.to_json(),
        state="queued",
        step=0,
        steps=0,
        progress="queued",
        log_path=CatalogueFiles.log_ref(job_id),
        variant_id=None,
        reason=None,
        created_at=now,
        started_at=None,
        finished_at=None,
        updated_at=now,
    )
    store.create_job(job)
    log.info(
        "build job %s queued for model %s by the %s: %s", job_id, model, origin, job.options_json
    )
    return job


@dataclass
class _Build:
    """A job this runner is running: its process once started, and what was asked of it."""

    job_id: str
    proc: subprocess.Popen[bytes] | None = None
    cancelled: str | None = None  # the reason, once cancelled
    registering: bool = False
    progress: Progress = field(default_factory=Progress)


class JobRunner:
    """Runs queued build jobs in worker threads (one build per thread, oldest job first)."""

    def __init__(
        self,
        store: CatalogueStore,
        files: CatalogueFiles,
        archives: ArchiveStore,
        signing_key: Path | None,
        *,
        workers: int = 1,
        poll_s: float = 1.0,
        progress_every_s: float = 0.5,
        python: str = sys.executable,
    ) -> None:
        self.store = store
        self.files = files
        self.archives = archives
        self.signing_key = signing_key
        self.workers = workers
        self.poll_s = poll_s
        self.progress_every_s = progress_every_s
        self.python = python
        self._lock = threading.Lock()
        self._builds: dict[str, _Build] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._measured_on: str | None = None

    # -- life -------------------------------------------------------------------------------

    def build_refusal(self) -> str | None:
        """Why this runner cannot build (no usable signing key), or None."""
        if self.signing_key is None:
            return "the coordinator has no --signing-key: it cannot sign the bundles it builds"
        if self.signing_key.name != PRIVATE_NAME:
            return (
                f"the signing key {self.signing_key} must be named {PRIVATE_NAME} "
                "(the optimizer takes its key directory)"
            )
        if not self.signing_key.is_file():
            return f"the signing key {self.signing_key} is not a file"
        return None

    def recover(self) -> list[str]:
        """Fail the jobs a dead coordinator left running, kill what is left of their builds,
        remove leftover files; the ids of the jobs failed. Call before start()."""
        failed: list[str] = []
        for job in self.store.jobs(states=["running"], limit=100_000):
            pid = kill_leftover(
                self.files.pid_file(job.job_id), str(self.files.work_dir(job.job_id))
            )
            if pid is not None:
                log.warning("build job %s: killed its leftover optimizer, pid %d", job.job_id, pid)
            if self.store.update_job(
                job.job_id,
                only_if=["running"],
                state="failed",
                reason=STOPPED,
                finished_at=time.time(),
            ):
                failed.append(job.job_id)
                log.warning("build job %s (model %s): %s", job.job_id, job.model, STOPPED)
            self.files.remove_work(job.job_id)
        for path in self.files.sweep(active_jobs=set()):
            log.info("catalogue: removed leftover %s", path)
        return failed

    def start(self) -> None:
        """Start the worker threads."""
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"catalogue-build-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        """A job was queued: look now, not at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Kill running builds (their jobs fail: STOPPED) and end the workers."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            builds = list(self._builds.values())
        for b in builds:
            if b.proc is not None and not b.registering:
                kill_group(b.proc.pid)
        for t in self._threads:
            t.join(timeout)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_next()
            except Exception as exc:  # the store may be briefly unreachable
                log.error("catalogue build worker: %s", exc)
                ran = None
            if ran is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    # -- one job ----------------------------------------------------------------------------

    def run_next(self) -> BuildJobRecord | None:
        """Claim the oldest queued job and run it to its end; the job as it ended, or None
        when nothing was queued."""
        if self._stop.is_set():
            return None
        queued = self.store.jobs(states=["queued"], limit=100_000)
        for job in sorted(queued, key=lambda j: (j.created_at, j.job_id)):
            claimed = self.store.update_job(
                job.job_id,
                only_if=["queued"],
                state="running",
                started_at=time.time(),
                progress="starting",
            )
            if claimed is None:
                continue  # cancelled, or another runner took it
            build = _Build(job.job_id)
            with self._lock:
                self._builds[job.job_id] = build
            try:
                self._run(claimed, build)
            except Exception as exc:
                self._fail(claimed, f"the build could not run: {exc}")
            finally:
                with self._lock:
                    self._builds.pop(job.job_id, None)
                self.files.remove_work(job.job_id)
            return self.store.job(job.job_id)
        return None

    def _run(self, job: BuildJobRecord, build: _Build) -> None:
        refusal = self.build_refusal()
        model = self.store.model(job.model)
        if refusal is not None or model is None:
            self._fail(job, refusal or f"model {job.model!r} is no longer in the catalogue")
            return
        try:
            options = BuildOptions.model_validate_json(job.options_json)
        except ValueError as exc:
            self._fail(job, f"unusable build options {job.options_json}: {exc}")
            return
        version = next_version(self.store, self.archives, model.name, model_id_of(model))
        out = self.files.fresh_work_dir(job.job_id) / "out"
        argv = self._argv(model, options, out, version)
        log_path = self.files.path(job.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            log_file.write(f"# build job {job.job_id}: version {version}\n".encode())
            log_file.write(("# " + " ".join(argv) + "\n").encode())
            log_file.flush()
            rc = self._spawn_and_follow(job, build, argv, out.parent, log_file)
        with self._lock:
            cancelled = build.cancelled
            if cancelled is None and rc == 0 and not self._stop.is_set():
                build.registering = True
        if cancelled is not None:
            log.info("build job %s (model %s): %s", job.job_id, job.model, cancelled)
            self.store.update_job(
                job.job_id, only_if=OPEN_JOB_STATES, state="cancelled", reason=cancelled,
                finished_at=time.time(),
            )
        elif self._stop.is_set():
            self._fail(job, STOPPED)
        elif rc != 0:
            self._fail(job, build.progress.failure(rc))
        else:
            self._register(job, model, out)

    def _argv(
        self, model: ModelRecord, options: BuildOptions, out: Path, version: int
    ) -> list[str]:
        assert self.signing_key is not None
        return [
            self.python,
            "-m",
            "edgefleet.server.catalogue.child",
            str(os.getpid()),
            "optimize",
            str(self.files.path(model.source_path)),
            f"--data={self.files.path(model.data_path)}",
            f"--out={out}",
            *optimize_args(options),
            f"--model-id={model_id_of(model)}",
            f"--version={version}",
            f"--keys-dir={self.signing_key.parent}",
        ]

    def _spawn_and_follow(
        self,
        job: BuildJobRecord,
        build: _Build,
        argv: list[str],
        cwd: Path,
        log_file: IO[bytes],
    ) -> int:
        """Run the build, stream its output into the log and its progress into the store
        (a few times a second at most); its exit status."""
        with self._lock:
            if build.cancelled is not None or self._stop.is_set():
                return -int(signal.SIGKILL)
            build.proc = spawn(argv, cwd)
        proc = build.proc
        write_atomic(self.files.pid_file(job.job_id), f"{proc.pid}\n".encode())
        log.info(
            "build job %s (model %s): optimizer started, pid %d", job.job_id, job.model, proc.pid
        )
        def feed(line: str) -> None:
            with self._lock:
                build.progress.feed(line)

        reader = threading.Thread(target=follow, args=(proc, log_file, feed), daemon=True)
        reader.start()
        pushed = checked = time.monotonic()
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - pushed >= self.progress_every_s and build.progress.changed:
                pushed = checked = now
                if not self._push(job, build):
                    self._cancelled_elsewhere(job, build)
            elif now - checked >= 2.0:
                checked = now
                current = self.store.job(job.job_id)
                if current is None or current.state != "running":
                    self._cancelled_elsewhere(job, build)
        reader.join(10)
        self._push(job, build)
        return rc

    def _push(self, job: BuildJobRecord, build: _Build) -> bool:
        """The newest progress into the store; False when the job is no longer running."""
        with self._lock:
            p = build.progress
            step, steps, line = p.step, p.steps, p.line
            p.changed = False
        if not line:
            return True
        return (
            self.store.update_job(
                job.job_id, only_if=["running"], step=step, steps=steps, progress=line
            )
            is not None
        )

    def _cancelled_elsewhere(self, job: BuildJobRecord, build: _Build) -> None:
        """The job left 'running' behind this runner's back (cancelled through another
        coordinator, or failed by a recover()): stop building it."""
        current = self.store.job(job.job_id)
        reason = (current.reason if current else None) or CANCELLED
        with self._lock:
            if build.cancelled is None:
                build.cancelled = reason
            if build.proc is not None:
                kill_group(build.proc.pid)

    def _register(self, job: BuildJobRecord, model: ModelRecord, out: Path) -> None:
        """Store the archive, register the variant, then say succeeded: in that order."""
        try:
            report = json.loads((out / "report.json").read_text())
            info = self.archives.add(out / "bundle")
            verified = verify_bundle(out / "bundle", self.archives.trusted_keys)
            if verified.manifest_sha256 != info.manifest_sha256:
                raise NotPossible("the bundle changed while it was being stored")
            variant = variant_from_report(
                model,
                job.job_id,
                job.options_json,
                info,
                verified.manifest,
                report,
                self._build_class(),
            )
            self.store.add_variant(variant)
            self.files.keep_report(job.job_id, out)
        except Exception as exc:
            self._fail(job, f"registering the build failed: {exc}")
            return
        done = self.store.update_job(
            job.job_id,
            only_if=["running"],
            state="succeeded",
            variant_id=variant.variant_id,
            progress=f"done: variant {variant.variant_id}",
            finished_at=time.time(),
        )
        if done is None:
            log.warning(
                "build job %s: registered variant %s, but the job was ended meanwhile",
                job.job_id,
                variant.variant_id,
            )
        log.info(
            "build job %s (model %s) succeeded: variant %s, archive %s (%d bytes)",
            job.job_id,
            model.name,
            variant.variant_id,
            info.sha256[:12],
            info.size,
        )

    def _fail(self, job: BuildJobRecord, reason: str) -> None:
        log.warning("build job %s (model %s) failed: %s", job.job_id, job.model, reason)
        self.store.update_job(
            job.job_id,
            only_if=OPEN_JOB_STATES,
            state="failed",
            reason=reason[:2000],
            finished_at=time.time(),
        )

    def _build_class(self) -> str:
        if self._measured_on is None:
            from edgefleet.agent.hardware import device_class

            self._measured_on = device_class()
        return self._measured_on

    # -- cancel -----------------------------------------------------------------------------

    def cancel(self, job_id: str, reason: str = CANCELLED) -> BuildJobRecord:
        """Cancel a queued or running job: its build process group is killed, its files go.

        UnknownJob; NotPossible when it has ended or its variant is being registered.
        """
        with self._lock:
            build = self._builds.get(job_id)
            if build is not None:
                if build.registering:
                    raise NotPossible(
                        f"build job {job_id} has finished building; its variant is being "
                        "registered"
                    )
                build.cancelled = reason
                if build.proc is not None:
                    kill_group(build.proc.pid)
            try:
                ended = self.store.update_job(
                    job_id,
                    only_if=OPEN_JOB_STATES,
                    state="cancelled",
                    reason=reason,
                    finished_at=time.time(),
                )
            except KeyError:
                raise UnknownJob(job_id) from None
        if ended is None:
            current = self.store.job(job_id)
            state = current.state if current else "gone"
            raise NotPossible(f"build job {job_id} has already ended ({state})")
        log.info("build job %s (model %s): %s", job_id, ended.model, reason)
        return ended
