"""Slots: version dirs, current/previous links, the trial journal, bad marks, prune, recover.

The crash test kills a real process with SIGKILL right after every step of an install and
proves that recover() then leaves `current` at a complete, verified bundle: the old or the
new one, never anything else.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.bundle import generate_private_key, save_public_key, verify_bundle
from edgefleet.agent.bundle.delta import make_delta
from edgefleet.agent.update.slots import MAX_TRIAL_STARTS, SlotError, Slots
from edgefleet.agent.update.stage import stage_dir
from tests.update.bundles import write_version
from tests.update.crash_install import STEPS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> Path:
    root = tmp_path_factory.mktemp("src")
    for v in (3, 4, 5):
        write_version(root / f"v{v}", key, v)
    save_public_key(key.public_key(), root / "fleet.pub")
    make_delta(root / "v4", root / "v3", root / "v4-delta.tar.gz")
    return root


def _sha(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def _slots_with(tmp_path: Path, key: Ed25519PrivateKey, src: Path, *versions: int) -> Slots:
    slots = Slots(tmp_path / "bundles")
    for v in versions:
        verified = stage_dir(src / f"v{v}", slots=slots, trusted_keys=[key.public_key()])
        slots.activate(verified.path, trial=False)
    return slots


def test_stage_names_the_version_dir_and_activate_switches_links(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3)
    cur = slots.current()
    assert cur is not None and cur.name == f"tiny-cnn-v3-{_sha(sources / 'v3')[:12]}"
    assert os.readlink(slots.dir / "current") == cur.name  # relative: the dir can move
    assert slots.previous() is None
    v4 = stage_dir(sources / "v4", slots=slots, trusted_keys=[key.public_key()])
    assert slots.current() == cur  # staging never switches
    slots.activate(v4.path)
    assert slots.current() == v4.path and slots.previous() == cur
    trial = slots.trial()
    assert trial is not None and trial["candidate"] == v4.path.name
    assert trial["previous"] == cur.name
    slots.confirm()
    assert slots.trial() is None
    assert {b.version for b in slots.installed()} == {3, 4}
    assert {b.manifest_sha256 for b in slots.installed()} == {
        _sha(sources / "v3"),
        _sha(sources / "v4"),
    }
    # Staging the same bundle again keeps the installed copy.
    again = stage_dir(sources / "v4", slots=slots, trusted_keys=[key.public_key()])
    assert again.path == v4.path
    assert not [p for p in slots.dir.iterdir() if p.name.startswith(".incoming-")]


def test_rollback_marks_bad_and_recover_refuses_it(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3, 4)
    v3, v4 = slots.previous(), slots.current()
    assert v3 is not None and v4 is not None
    assert slots.rollback("p95 31.5 ms over budget") == v3
    assert slots.current() == v3 and slots.previous() is None
    assert v4.is_dir()  # kept until pruned
    assert slots.is_bad(_sha(v4)) == "p95 31.5 ms over budget"
    with pytest.raises(SlotError, match="cannot roll back"):
        slots.rollback("again")
    with pytest.raises(SlotError, match="rolled back from: p95"):
        slots.activate(v4, allow_bad=False)
    # An explicit re-install activates it and clears the mark.
    slots.activate(v4)
    assert slots.current() == v4 and slots.is_bad(_sha(v4)) is None


def test_recover_moves_off_a_current_marked_bad(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3, 4)
    v3, v4 = slots.previous(), slots.current()
    assert v3 is not None and v4 is not None
    slots.mark_bad(_sha(v4), "failed", v4.name)  # as if killed inside rollback()
    report = slots.recover([key.public_key()])
    assert report.current == v3 and report.fell_back is not None
    assert "rolled back from" in report.fell_back and report.changed


def test_recover_falls_back_when_current_is_damaged_or_missing(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3, 4)
    v3, v4 = slots.previous(), slots.current()
    assert v3 is not None and v4 is not None
    (v4 / "stage1.onnx").write_bytes(b"torn")
    report = slots.recover([key.public_key()])
    assert report.current == v3
    assert report.fell_back is not None and "stage1.onnx" in report.fell_back
    assert "fell back" in report.summary()
    assert slots.is_bad(_sha(v4)) is not None

    slots2 = _slots_with(tmp_path / "b", key, sources, 3, 4)
    prev = slots2.previous()
    cur = slots2.current()
    assert cur is not None
    os.rename(cur, cur.with_name("gone"))  # a dangling current
    report = slots2.recover([key.public_key()])
    assert report.current == prev and report.fell_back == "current is missing"


def test_recover_with_nothing_usable_says_so(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3)
    cur = slots.current()
    assert cur is not None
    (cur / "manifest.sig").write_bytes(b"x" * 64)
    report = slots.recover([key.public_key()])
    assert report.current is None and report.fell_back is not None
    assert "manifest.sig" in report.fell_back or "signature" in report.fell_back


def test_a_trial_the_agent_keeps_dying_in_is_rolled_back(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3)
    v3 = slots.current()
    v4 = stage_dir(sources / "v4", slots=slots, trusted_keys=[key.public_key()])
    slots.activate(v4.path)  # trial journal written, never confirmed
    first = slots.recover([key.public_key()])
    assert first.recovered_trial and first.current == v4.path
    for _ in range(MAX_TRIAL_STARTS - 1):
        report = slots.recover([key.public_key()])
    assert report.trial_rolled_back and report.current == v3
    assert slots.is_bad(v4.manifest_sha256) is not None and slots.trial() is None


def test_prune_keeps_current_and_previous(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path
) -> None:
    slots = _slots_with(tmp_path, key, sources, 5, 3, 4)  # v5 oldest, then v3, v4 current
    slots.confirm()
    dirs = {b.version: b.dir for b in slots.installed()}
    os.utime(dirs[5], (1, 1))
    one = sum(f.stat().st_size for f in dirs[5].rglob("*") if f.is_file())
    assert slots.prune(slots.size()) == []  # within budget: nothing to do
    assert slots.prune(0) == [dirs[5].name]  # never current (v4) or previous (v3)
    assert {b.version for b in slots.installed()} == {3, 4}
    assert slots.free_for(one, budget_bytes=10 * one)
    assert not slots.free_for(one, budget_bytes=2 * one)  # v3 + v4 already take 2 * one


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_any_step_leaves_a_verified_current(
    tmp_path: Path, key: Ed25519PrivateKey, sources: Path, step: str
) -> None:
    slots = _slots_with(tmp_path, key, sources, 3)
    old_sha, new_sha = _sha(sources / "v3"), _sha(sources / "v4")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.update.crash_install",
            str(slots.dir),
            str(sources / "v4-delta.tar.gz"),
            str(sources / "fleet.pub"),
            new_sha,
            step,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if step == "none":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -9, f"{step}: rc {proc.returncode}: {proc.stderr}"
    report = slots.recover([key.public_key()])
    assert report.current is not None
    verified = verify_bundle(slots.dir / "current", [key.public_key()])
    assert verified.manifest_sha256 in (old_sha, new_sha)
    switched = step in ("current", "none")
    assert verified.manifest_sha256 == (new_sha if switched else old_sha), step
    assert report.recovered_trial == switched
    assert not [p for p in slots.dir.iterdir() if p.name.startswith((".incoming-", ".current"))]
    # The install can simply be run again after any crash.
    if not switched:
        rerun = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.update.crash_install",
                str(slots.dir),
                str(sources / "v4-delta.tar.gz"),
                str(sources / "fleet.pub"),
                new_sha,
                "none",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rerun.returncode == 0, rerun.stderr
        assert verify_bundle(slots.dir / "current", [key.public_key()]).manifest_sha256 == new_sha


def test_recover_on_a_device_that_never_installed_anything_changes_nothing(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """The agent runs its configured bundle: no current link is not a broken current."""
    slots = Slots(tmp_path / "bundles")
    (slots.dir / ".incoming-0123").mkdir()  # a first download killed while staging
    report = slots.recover([key.public_key()])
    assert report.current is None and report.fell_back is None and not report.trial_rolled_back
    assert report.removed_incoming == (".incoming-0123",)
    assert "fell back" not in report.summary()
    assert not Slots(tmp_path / "bundles").recover([key.public_key()]).changed
