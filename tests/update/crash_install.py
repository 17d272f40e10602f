"""Stage and activate a bundle archive, SIGKILLing this process right after one named step.

    python -m tests.update.crash_install BUNDLES_DIR ARCHIVE PUBKEY EXPECT_SHA STEP

STEP is one of STEPS ("none" runs to the end). The hooks wrap the real functions the install
calls, so the process dies exactly where a power cut after that step would leave the disk.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle import load_public_key
from edgefleet.agent.update import slots as slots_mod
from edgefleet.agent.update import stage as stage_mod
from edgefleet.agent.update.slots import Slots

STEPS = (
    "unpack",
    "fill",
    "verify",
    "rename",
    "journal",
    "previous",
    "symlink-tmp",
    "current",
    "none",
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(fn: Callable[..., Any], when: Callable[..., bool] = lambda *a, **k: True) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if when(*args, **kwargs):
            _die()
        return out

    return wrapped


def main() -> None:
    bundles, archive, pubkey, expect, step = sys.argv[1:6]
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}")
    if step == "unpack":
        stage_mod.unpack = _after(stage_mod.unpack)  # type: ignore[assignment]
    elif step == "fill":
        stage_mod.fill_from = _after(stage_mod.fill_from)  # type: ignore[assignment]
    elif step == "verify":
        stage_mod.verify_bundle = _after(stage_mod.verify_bundle)  # type: ignore[assignment]
    elif step == "rename":
        Slots.stage = _after(Slots.stage)  # type: ignore[method-assign]
    elif step == "journal":
        slots_mod.write_json_atomic = _after(slots_mod.write_json_atomic)  # type: ignore[assignment]
    elif step in ("previous", "current"):
        link = slots_mod.PREVIOUS if step == "previous" else slots_mod.CURRENT
        Slots._switch = _after(  # type: ignore[method-assign]
            Slots._switch, lambda _self, name, _target: name == link
        )
    elif step == "symlink-tmp":
        os.symlink = _after(  # type: ignore[assignment]
            os.symlink, lambda _src, dst, *a, **k: str(dst).endswith(".current.new")
        )
    slots = Slots(Path(bundles))
    sources = [b.dir for b in slots.installed()]
    verified = stage_mod.stage_archive(
        Path(archive),
        slots,
        sources,
        [load_public_key(pubkey)],
        expect_manifest_sha256=expect,
    )
    slots.activate(verified.path)
    print("done", verified.path.name)


if __name__ == "__main__":
    main()
