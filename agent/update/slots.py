"""The bundle versions on the device's disk, and the two links that say which one runs.

Layout of `state_dir/bundles/`:

    tiny-cnn-v3-0123456789ab/   one directory per installed bundle: {model_id}-v{version}-
                                {manifest_sha256[:12]}, complete and verified before it gets
                                this name (staged in .incoming-*, fsynced, renamed)
    current -> tiny-cnn-v4-…    what the agent runs (a relative symlink)
    previous -> tiny-cnn-v3-…   what `rollback` goes back to
    update.json                 the journal of a switch in progress (a trial)
    bad.json                    manifest sha256s that failed and were rolled back from
    .incoming-*                 staging; whatever is left of it at start is removed

Every change is an atomic rename of something complete: a symlink is made as `.current.new`
and renamed over `current`, a JSON file is written, fsynced and renamed over the old one, and
the directory is fsynced after. So a SIGKILL or power cut at any step leaves `current` at
either the old or the new bundle, and `recover()` at the next start repairs the rest
(tests/update/test_slots.py kills a real process after every step).

Decisions:
* `activate` writes the journal (state "trial") before switching: the new bundle has passed
  its health check but not yet run frames in the loop. `confirm()` clears it.
* `rollback(reason)`: current <- previous; the rolled-back-from bundle's manifest sha256 goes
  into bad.json and `previous` is removed (nothing newer than current is known good). The
  directory stays on disk until pruned. A bad sha256 is never activated again unless the
  caller says so explicitly (`activate(..., force=True)`, an operator's re-install), which
  clears the mark.
* A trial journal found at start means the agent died while the candidate was on trial. It
  had passed the health check, so it is kept (`recovered_trial`) once; if the agent dies in
  the trial again (MAX_TRIAL_STARTS), the candidate is treated as the cause: rolled back and
  marked bad. This stops a model that crashes the process from crash-looping the device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.bundle import BundleError, VerifiedBundle, verify_bundle
from edgefleet.agent.bundle.delta import read_manifest_bytes
from edgefleet.agent.bundle.digest import sha256_bytes, sha256_file
from edgefleet.agent.bundle.manifest import RESERVED_NAMES
from edgefleet.agent.bundle.strict_json import loads_unique
from edgefleet.agent.bundle.tree import plain_tree
from edgefleet.agent.durable import fsync_dir

log = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"
JOURNAL = "update.json"
BAD = "bad.json"
INCOMING_PREFIX = ".incoming-"
MAX_TRIAL_STARTS = 2


class SlotError(BundleError):
    """The on-disk versions cannot do what was asked (no previous, a bad bundle...)."""


@dataclass(frozen=True)
class InstalledBundle:
    """One version directory under bundles/."""

    dir: Path
    model_id: str
    version: int
    manifest_sha256: str

    @property
    def path(self) -> Path:
        """The version directory (same as .dir)."""
        return self.dir


@dataclass(frozen=True)
class RecoveryReport:
    """What recover() found and did at agent start; `current` is what to run (None: nothing)."""

    current: Path | None
    previous: Path | None
    removed_incoming: tuple[str, ...] = ()
    fell_back: str | None = None  # why current was replaced by previous
    recovered_trial: bool = False
    trial_rolled_back: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> bool:
        """Did recover() find anything to repair or report?"""
        return bool(
            self.removed_incoming
            or self.fell_back
            or self.recovered_trial
            or self.trial_rolled_back
            or self.notes
        )

    def summary(self) -> str:
        """One line for the log and an event."""
        parts = list(self.notes)
        if self.fell_back:
            parts.append(f"fell back to previous: {self.fell_back}")
        if self.trial_rolled_back:
            parts.append("rolled back a bundle the agent kept dying on")
        now = self.current.name if self.current else "none"
        return f"bundles recovered (current {now}): " + "; ".join(parts or ["nothing to do"])


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (links refused by plain_tree), then root."""
    tree = plain_tree(root)
    for rel in tree.files:
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for rel in reversed(tree.dirs):
        fsync_dir(root / rel)
    fsync_dir(root)


def write_json_atomic(path: Path, value: Any) -> None:
    """tmp + fsync + rename + fsync(dir): the file holds the old or the new value, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = loads_unique(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("bundles: %s unreadable (%s); ignoring it", path, exc)
        return None
    return raw if isinstance(raw, dict) else None


class Slots:
    """The version directories under bundles_dir and the current/previous links."""

    def __init__(self, bundles_dir: Path) -> None:
        self.dir = Path(bundles_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        """The bundles directory (same as .dir)."""
        return self.dir

    # -- staging -------------------------------------------------------------------------------

    def new_incoming(self) -> Path:
        """A fresh staging path on the same filesystem (not created: unpack creates it)."""
        return self.dir / f"{INCOMING_PREFIX}{uuid.uuid4().hex[:12]}"

    @staticmethod
    def final_name(model_id: str, version: int, manifest_sha256: str) -> str:
        """The version directory's name."""
        return f"{model_id}-v{version}-{manifest_sha256[:12]}"

    def stage(self, verified: VerifiedBundle) -> VerifiedBundle:
        """fsync a verified bundle staged in bundles/.incoming-* and rename it into place.

        If the same bundle (same manifest sha256 and identical files) is installed already,
        the staged copy is dropped and the installed one returned.
        """
        src = Path(verified.path)
        if src.parent.resolve() != self.dir.resolve() or not src.name.startswith(INCOMING_PREFIX):
            raise SlotError(src, f"stage() takes a bundle in {self.dir}/{INCOMING_PREFIX}*")
        m = verified.manifest
        final = self.dir / self.final_name(m.model_id, m.version, verified.manifest_sha256)
        fsync_tree(src)
        if final.exists() or final.is_symlink():
            if _same_content(final, verified):
                shutil.rmtree(src)
                log.info("bundles: %s already installed; staged copy dropped", final.name)
                return VerifiedBundle(final, m, verified.manifest_sha256)
            if final.resolve() in (self.current(), self.previous()):
                raise SlotError(final, "differs from its manifest and is current or previous")
            # A damaged copy that nothing runs: replace it (renamed aside first, so the name
            # is never empty of a complete bundle for longer than one rename).
            aside = self.dir / f"{INCOMING_PREFIX}old-{uuid.uuid4().hex[:8]}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(src, final)
        fsync_dir(self.dir)
        log.info("bundles: staged %s", final.name)
        return VerifiedBundle(final, m, verified.manifest_sha256)

    # -- links ---------------------------------------------------------------------------------

    def _target(self, link: str) -> Path | None:
        path = self.dir / link
        try:
            name = os.readlink(path)
        except OSError:
            return None
        target = self.dir / name
        return target if target.is_dir() and not target.is_symlink() else None

    def current(self) -> Path | None:
        """The version directory `current` points at, or None (missing or dangling)."""
        return self._target(CURRENT)

    def previous(self) -> Path | None:
        """The version directory `previous` points at, or None."""
        return self._target(PREVIOUS)

    def _switch(self, link: str, target: Path | None) -> None:
        """Point link at target (a version dir) atomically; None removes the link."""
        path = self.dir / link
        if target is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fsync_dir(self.dir)
            return
        if Path(target).parent.resolve() != self.dir.resolve():
            raise SlotError(target, f"is not a version directory of {self.dir}")
        tmp = self.dir / f".{link}.new"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(Path(target).name, tmp)
        os.replace(tmp, path)
        fsync_dir(self.dir)

    def activate(self, final_dir: Path, *, trial: bool = True, allow_bad: bool = True) -> None:
        """previous <- current's target, current <- final_dir.

        trial=True writes the journal first (see the module's decisions). An activation is an
        explicit install, so by default it clears a bad mark on the bundle; allow_bad=False
        refuses a bundle marked bad instead (SlotError naming why it was marked).
        """
        final_dir = Path(final_dir)
        sha = _manifest_sha(final_dir)
        if sha is None:
            raise SlotError(final_dir, "has no readable manifest.json")
        bad = self.bad()
        if sha in bad:
            if not allow_bad:
                raise SlotError(
                    final_dir, f"manifest {sha[:12]} was rolled back from: {bad[sha]['reason']}"
                )
            self.clear_bad(sha)
        old = self.current()
        if old is not None and old.resolve() == final_dir.resolve():
            return
        if trial:
            write_json_atomic(
                self.dir / JOURNAL,
                {
                    "state": "trial",
                    "candidate": final_dir.name,
                    "previous": old.name if old else None,
                    "started": time.time(),
                    "starts": 0,
                },
            )
        if old is not None:
            self._switch(PREVIOUS, old)
        self._switch(CURRENT, final_dir)
        log.info("bundles: current -> %s (previous %s)", final_dir.name, old.name if old else "-")

    def trial(self) -> dict[str, Any] | None:
        """The journal of a switch on trial, or None."""
        raw = _read_json(self.dir / JOURNAL)
        return raw if raw is not None and raw.get("state") == "trial" else None

    def confirm(self) -> None:
        """The candidate ran frames in the loop: the trial is over."""
        with contextlib.suppress(FileNotFoundError):
            (self.dir / JOURNAL).unlink()
            fsync_dir(self.dir)

    def rollback(self, reason: str) -> Path:
        """current <- previous; mark the rolled-back-from bundle bad; returns the new current."""
        prev = self.previous()
        if prev is None:
            raise SlotError(self.dir, f"cannot roll back ({reason}): no previous bundle")
        bad_dir = self.current()
        if bad_dir is not None and bad_dir.resolve() != prev.resolve():
            sha = _manifest_sha(bad_dir)
            if sha is not None:
                self.mark_bad(sha, reason, bad_dir.name)
        self._switch(CURRENT, prev)
        self._switch(PREVIOUS, None)
        self.confirm()
        log.warning(
            "bundles: rolled back %s -> %s: %s", bad_dir.name if bad_dir else "-", prev.name, reason
        )
        return prev

    # -- bad bundles ---------------------------------------------------------------------------

    def bad(self) -> dict[str, dict[str, Any]]:
        """manifest sha256 -> {"dir", "reason", "ts"} of bundles rolled back from."""
        raw = _read_json(self.dir / BAD) or {}
        entries = raw.get("bad", {})
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def mark_bad(self, manifest_sha256: str, reason: str, dir_name: str | None = None) -> None:
        """Remember that this bundle failed, so it is not activated again automatically."""
        entries = self.bad()
        entries[manifest_sha256] = {"dir": dir_name, "reason": reason[:500], "ts": time.time()}
        write_json_atomic(self.dir / BAD, {"bad": entries})

    def is_bad(self, manifest_sha256: str) -> str | None:
        """Why this bundle was marked bad, or None."""
        entry = self.bad().get(manifest_sha256)
        return None if entry is None else str(entry.get("reason", "marked bad"))

    def clear_bad(self, manifest_sha256: str) -> None:
        """Forget a bad mark (an operator re-installed the bundle explicitly)."""
        entries = self.bad()
        if entries.pop(manifest_sha256, None) is not None:
            write_json_atomic(self.dir / BAD, {"bad": entries})

    # -- inventory -----------------------------------------------------------------------------

    def installed(self) -> list[InstalledBundle]:
        """Every version directory with a readable manifest (not verified: for fill_from)."""
        out: list[InstalledBundle] = []
        for path in sorted(self.dir.iterdir()):
            if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
                continue
            try:
                data = read_manifest_bytes(path)
                raw = loads_unique(data)
                out.append(
                    InstalledBundle(
                        path, str(raw["model_id"]), int(raw["version"]), sha256_bytes(data)
                    )
                )
            except (BundleError, ValueError, KeyError, TypeError):
                continue
        return out

    def _protected(self) -> set[Path]:
        keep = {p.resolve() for p in (self.current(), self.previous()) if p is not None}
        journal = self.trial()
        if journal is not None:
            for key in ("candidate", "previous"):
                if isinstance(journal.get(key), str):
                    keep.add((self.dir / journal[key]).resolve())
        return keep

    def size(self) -> int:
        """Bytes of every file under bundles_dir (links not followed)."""
        total = 0
        for root, _dirs, files in os.walk(self.dir):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def prune(self, budget_bytes: int) -> list[str]:
        """Delete version dirs, oldest first, until the total is within budget.

        Never current's, previous's or a trial's directories. Returns the names removed.
        """
        keep = self._protected()
        candidates = sorted(
            (b.dir for b in self.installed() if b.dir.resolve() not in keep),
            key=lambda p: p.stat().st_mtime,
        )
        removed: list[str] = []
        total = self.size()
        for path in candidates:
            if total <= budget_bytes:
                break
            freed = _dir_size(path)
            shutil.rmtree(path, ignore_errors=True)
            total -= freed
            removed.append(path.name)
            log.info("bundles: pruned %s (%d bytes)", path.name, freed)
        if removed:
            fsync_dir(self.dir)
        return removed

    def free_for(self, size: int, budget_bytes: int) -> bool:
        """Can a bundle of `size` bytes fit once everything prunable is pruned?

        It must fit next to current and previous within budget_bytes, and on the disk: the
        archive and its unpacked copy exist side by side while it is staged.
        """
        kept = sum(_dir_size(p) for p in self._protected() if p.is_dir())
        prunable = self.size() - kept
        disk_free = shutil.disk_usage(self.dir).free
        return kept + size <= budget_bytes and 2 * size <= disk_free + max(prunable, 0)

    # -- start-up ------------------------------------------------------------------------------

    def recover(self, trusted_keys: Iterable[Ed25519PublicKey]) -> RecoveryReport:
        """Repair what an interrupted install left, so `current` is a verified bundle."""
        keys = list(trusted_keys)
        notes: list[str] = []
        removed = []
        for path in sorted(self.dir.iterdir()):
            if path.name.startswith(INCOMING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
            elif path.name in (f".{CURRENT}.new", f".{PREVIOUS}.new", f".{JOURNAL}.tmp"):
                path.unlink(missing_ok=True)
        if removed:
            fsync_dir(self.dir)
            notes.append(f"removed {len(removed)} interrupted staging dir(s)")

        fell_back: str | None = None
        recovered_trial = trial_rolled_back = False
        journal = self.trial()
        cur = self.current()
        if journal is not None:
            candidate = journal.get("candidate")
            if cur is None or cur.name != candidate:
                # Killed before the switch: the candidate never ran; the old bundle stays.
                notes.append(f"trial of {candidate} had not started; cleared")
                self.confirm()
            else:
                starts = int(journal.get("starts", 0)) + 1
                if starts >= MAX_TRIAL_STARTS and self.previous() is not None:
                    self.rollback(f"the agent died {starts} times while {candidate} was on trial")
                    trial_rolled_back = True
                else:
                    write_json_atomic(self.dir / JOURNAL, {**journal, "starts": starts})
                    recovered_trial = True
                    notes.append(f"{candidate} was on trial when the agent stopped; kept")
        cur = self.current()
        fresh = not (self.dir / CURRENT).is_symlink() and not (self.dir / PREVIOUS).is_symlink()
        # Nothing installed yet (the agent runs its configured bundle): nothing to fall from.
        why = None if fresh else self._unusable(cur, keys)
        if why is not None:
            prev = self.previous()
            if prev is not None and self._unusable(prev, keys) is None:
                fell_back = why
                if cur is not None:
                    sha = _manifest_sha(cur)
                    if sha is not None and "rolled back from" not in why:
                        self.mark_bad(sha, why, cur.name)
                self._switch(CURRENT, prev)
                self._switch(PREVIOUS, None)
                self.confirm()
                log.warning("bundles: current unusable (%s); back on %s", why, prev.name)
            else:
                notes.append(f"current unusable ({why}) and no usable previous")
                return RecoveryReport(
                    None,
                    None,
                    tuple(removed),
                    why,
                    recovered_trial,
                    trial_rolled_back,
                    tuple(notes),
                )
        return RecoveryReport(
            self.current(),
            self.previous(),
            tuple(removed),
            fell_back,
            recovered_trial,
            trial_rolled_back,
            tuple(notes),
        )

    def _unusable(self, path: Path | None, keys: list[Ed25519PublicKey]) -> str | None:
        """Why path cannot run (None: it verifies and is not marked bad)."""
        if path is None:
            return "current is missing"
        try:
            verified = verify_bundle(path, keys)
        except BundleError as exc:
            return f"{path.name} fails verification: {exc.detail}"
        if verified.manifest_sha256 in self.bad():
            return f"{path.name} was rolled back from before"
        return None


def _manifest_sha(path: Path) -> str | None:
    try:
        return sha256_bytes(read_manifest_bytes(path))
    except BundleError:
        return None


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _same_content(existing: Path, verified: VerifiedBundle) -> bool:
    """Does `existing` hold exactly the verified bundle's manifest and files?"""
    try:
        if sha256_bytes(read_manifest_bytes(existing)) != verified.manifest_sha256:
            return False
        tree = plain_tree(existing)
        names = set(tree.files) - RESERVED_NAMES
        if names != set(verified.manifest.files):
            return False
        for name, entry in verified.manifest.files.items():
            if sha256_file(existing / name) != (entry.sha256, entry.size):
                return False
        sig = verified.path / "manifest.sig"
        return (existing / "manifest.sig").read_bytes() == sig.read_bytes()
    except (BundleError, OSError):
        return False
