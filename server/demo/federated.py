"""The demo's federated round: the agents fine-tune the INT8 bundle's exit heads on their own
frames, the coordinator averages the deltas, judges them on held-out images and rolls the
result out as version + 1, a delta through a canary; then the agents' telemetry says whether
more frames leave early than before.

No labels: every PROBE_EVERY-th camera frame runs at full depth and the final head's
confident answer labels what each early exit saw (self-distillation). The round goes
through the coordinator's API exactly as `edgefleet fl start ... --watch` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.protocol import FedUpdate, Telemetry
from edgefleet.server.cli.fl import watch as watch_round
from edgefleet.server.cli.rollout import watch as watch_rollout
from edgefleet.server.demo.checks import Checks
from edgefleet.server.demo.console import Story
from edgefleet.server.demo.rollout import GROUP
from edgefleet.server.federated.client import RoundClient
from edgefleet.server.federated.views import RoundView
from edgefleet.server.fleet.client import ApiError
from edgefleet.server.fleet.store.base import EventRecord, Store
from edgefleet.server.local.waiting import poll_until
from edgefleet.server.rollout.rules import pooled

# One camera frame in five runs at full depth for a pseudo label: at 30 fps an agent has the
# 40 confident examples a round needs (32 to train, a fifth to validate) within 7 s of a
# model change, which matters because installs and rollbacks start empty buffers.
PROBE_EVERY = 5
AGENT_CONFIG = f"[federated]\nenabled = true\nprobe_every = {PROBE_EVERY}\n"
DEADLINE_S = 60  # the round closes as soon as every agent reported, normally in seconds
SOAK_S = 6  # three telemetry windows of the canary on the new heads
HALT_RULES = ["exit_rate<0.3", "p95_ms>50", "error_rate>0.01"]
ROUND_TIMEOUT_S = DEADLINE_S + 60  # the deadline, aggregation and evaluation
ROLLOUT_TIMEOUT_S = 90
WINDOWS_AFTER = 3  # telemetry windows each agent sends on the new version before comparing
WINDOWS_TIMEOUT_S = 30
# The reference video shows the first 400 test images, on which the bundle already sends
# 98.5 % of frames out at an early exit: there is at most 1.5 points to gain. The windows
# before and after cover different stretches of the looped video, and its six hard frames
# are unevenly spread (240 consecutive frames exit 97.9 % to 99.6 %), so equal heads can
# differ by up to 1.7 points: the check is "not worse" within 2 points, and the printed
# figures show the change as measured.
EXIT_RATE_TOLERANCE = 0.02


def write_holdout(
    images: npt.NDArray[np.uint8], labels: npt.NDArray[np.int64], skip: int, path: Path
) -> Path:
    """The coordinator's held-out set: the labelled images after the first `skip` (those the
    video shows, which the agents train on), as images/labels in an .npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images[skip:], labels=labels[skip:])
    return path


def round_spec(agents: int) -> dict[str, Any]:
    """POST /fed/rounds for the demo group: pseudo labels, q8 deltas, every agent needed."""
    return {
        "group": GROUP,
        "labels": "pseudo",
        "compression": "q8",
        "deadline_s": DEADLINE_S,
        "quorum": str(agents),
        "cpu_budget_s": 5.0,
        "rollout": {
            "canary": "1",
            "soak_s": SOAK_S,
            "halt_if": HALT_RULES,
            "waves": "100%",
            "device_deadline_s": 120,
        },
    }


def split_windows(
    windows: Iterable[Telemetry],
    model_id: str,
    base_version: int,
    new_version: int,
    round_started: float,
    installed_at: float,
) -> tuple[list[Telemetry], list[Telemetry]]:
    """One device's windows on the base while the round ran and until it installed the new
    version, and its windows on the new version after that; a window in which the model
    changed belongs to neither (its frames ran on both)."""
    before: list[Telemetry] = []
    after: list[Telemetry] = []
    for w in windows:
        if w.model_id != model_id:
            continue
        if (
            w.model_version == base_version
            and w.window_start >= round_started
            and w.window_end <= installed_at
        ):
            before.append(w)
        elif w.model_version == new_version and w.window_start >= installed_at:
            after.append(w)
    return before, after


def frames(windows: Sequence[Telemetry]) -> int:
    """Frames in the windows' exit histograms (what the exit rate is a share of)."""
    return sum(sum(w.exit_histogram) for w in windows)


def _installs(store: Store, ids: list[str], manifest: str) -> dict[str, EventRecord]:
    """Each agent's 'installed' event for this manifest, if it came."""
    found: dict[str, EventRecord] = {}
    for i in ids:
        for rec in store.events(i, limit=200):
            ev = rec.event
            if ev.kind == "installed" and ev.details.get("manifest_sha256") == manifest:
                found[i] = rec
                break
    return found


def _skipped(store: Store, ids: list[str], since: float) -> list[str]:
    """The agents' fed_skipped events since the round began, in words."""
    return [
        f"{r.device_id}: {r.event.message}"
        for i in ids
        for r in store.events(i, limit=200)
        if r.event.kind == "fed_skipped" and r.event.ts >= since
    ]


def _updates(store: Store, view: RoundView) -> dict[str, FedUpdate]:
    """The updates the round accepted, as the devices sent them."""
    out: dict[str, FedUpdate] = {}
    for rec in store.fed_updates(view.round_id, ["accepted"], with_payload=True):
        if rec.payload is not None:
            out[rec.device_id] = FedUpdate.model_validate_json(rec.payload)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def run_round(
    client: RoundClient, store: Store, ids: list[str], story: Story, checks: Checks
) -> dict[str, Any]:
    """Run one round on the agents, roll its result out, compare the exit rates; checked."""
    story.say("a federated round: each agent fine-tunes the exit heads on its own frames, no")
    story.say(f"  labels (1 frame in {PROBE_EVERY} runs at full depth and the final head's")
    story.say("  confident answer labels what each exit saw; no frame leaves the device)")
    story.say("  and sends an 8-bit delta; the coordinator averages the deltas,")
    story.say("  checks the new heads on test images the video does not show and rolls them")
    story.say("  out as the next version, a delta, through a canary")
    spec = round_spec(len(ids))
    rollout = spec["rollout"]
    halts = " ".join(f"--halt-if '{r}'" for r in rollout["halt_if"])
    story.say(
        f"$ edgefleet fl start --group {GROUP} --labels pseudo --compression q8 "
        f"--deadline {DEADLINE_S}s --quorum {spec['quorum']} --canary 1 --soak {SOAK_S}s "
        f"{halts} --watch"
    )
    try:
        started = client.start_round(spec)
        view = watch_round(
            client,
            started.round_id,
            poll_s=0.5,
            say=lambda line: story.say("  " + line),
            timeout_s=ROUND_TIMEOUT_S,
        )
    except (ApiError, TimeoutError) as exc:
        checks.check("federated round ended done", False, str(exc))
        return {"federated": None}
    result: dict[str, Any] = {"round": view.model_dump(mode="json")}
    updates = _updates(store, view)
    missing = [i for i in ids if i not in updates]
    checks.check(
        "every agent sent a federated update",
        not missing,
        f"accepted from {', '.join(sorted(updates)) or 'none'}"
        + (f"; none from {', '.join(missing)}" if missing else "")
        + "".join(f"; {s}" for s in _skipped(store, missing, view.created_at)),
    )
    for i, u in sorted(updates.items()):
        story.say(
            f"  {i}: {u.samples} frames trained, {u.val_samples} validated: accuracy "
            f"{_pct(u.val_accuracy_before)} -> {_pct(u.val_accuracy_after)}, exit rate "
            f"{_pct(u.val_exit_rate_before)} -> {_pct(u.val_exit_rate_after)}; "
            f"update {u.encoded_bytes:,} bytes ({u.raw_bytes:,} as float32), {u.cpu_s:.2f} CPU s"
        )
    figures = view.figures or {}
    held = figures.get("holdout")
    if held:
        story.say(
            f"  held-out ({held['samples']} images): accuracy {held['accuracy_before']:.1%} -> "
            f"{held['accuracy_after']:.1%}, early exits {held['exit_rate_before']:.1%} -> "
            f"{held['exit_rate_after']:.1%}"
        )
    checks.check(
        "federated round ended done",
        view.state == "done",
        f"round {view.round_id} {view.state}: {view.reason}",
    )
    result.update(
        updates={
            i: {
                "samples": u.samples,
                "val_samples": u.val_samples,
                "val_accuracy_before": u.val_accuracy_before,
                "val_accuracy_after": u.val_accuracy_after,
                "val_exit_rate_before": u.val_exit_rate_before,
                "val_exit_rate_after": u.val_exit_rate_after,
                "encoded_bytes": u.encoded_bytes,
                "raw_bytes": u.raw_bytes,
            }
            for i, u in updates.items()
        }
    )
    if view.state != "done" or view.rollout_id is None:
        return {"federated": result}
    result.update(_follow(client, store, ids, view, story, checks))
    return {"federated": result}


def _follow(
    client: RoundClient,
    store: Store,
    ids: list[str],
    view: RoundView,
    story: Story,
    checks: Checks,
) -> dict[str, Any]:
    """Watch the round's rollout; check versions and deltas; compare the exit rates."""
    assert view.rollout_id is not None and view.result_version is not None
    new, base = view.result_version, view.base_version
    story.say(f"  v{new} goes out as rollout {view.rollout_id}:")
    try:
        rolled = watch_rollout(
            client,
            view.rollout_id,
            poll_s=0.5,
            say=lambda line: story.say("    " + line),
            timeout_s=ROLLOUT_TIMEOUT_S,
        )
    except (ApiError, TimeoutError) as exc:
        checks.check(f"every agent runs v{new} from the round", False, str(exc))
        return {"fed_rollout": None}
    manifest = rolled.manifest_sha256

    def running() -> dict[str, str | None]:
        return {d.device_id: d.bundle_sha256 for d in client.devices() if d.device_id in ids}

    on_new = poll_until(lambda: set(running().values()) == {manifest}, 20)
    checks.check(
        f"every agent runs v{new} from the round",
        rolled.state == "completed" and rolled.counts.get("active") == len(ids) and on_new,
        f"rollout {rolled.rollout_id} {rolled.state}: {rolled.counts}; running "
        + ", ".join(f"{d}: {(sha or '-')[:12]}" for d, sha in sorted(running().items())),
    )
    installs = _installs(store, ids, manifest)
    transfers = {
        i: str(installs[i].event.details.get("transfer")) if i in installs else "-" for i in ids
    }
    delta = next(
        (b for b in client.bundles() if b.kind == "delta" and b.manifest_sha256 == manifest),
        None,
    )
    full = next((b for b in client.bundles() if b.sha256 == rolled.bundle_sha256), None)
    checks.check(
        f"v{new} installed as a delta",
        all(t == "delta" for t in transfers.values()),
        ", ".join(f"{i}: {t}" for i, t in transfers.items())
        + (f"; delta {delta.size:,} bytes" if delta else "; no delta archive")
        + (f", full bundle {full.size:,} bytes" if full else ""),
    )
    if delta and full:
        story.say(
            f"  each agent fetched a {delta.size / 1024:.1f} KiB delta (the head files) instead "
            f"of the {full.size / 1024:.0f} KiB bundle"
        )

    def after_windows() -> dict[str, list[Telemetry]]:
        return {i: _split(store, i, view, installs[i].event.ts)[1] for i in ids if i in installs}

    poll_until(
        lambda: all(len(after_windows().get(i, [])) >= WINDOWS_AFTER for i in ids),
        WINDOWS_TIMEOUT_S,
    )
    before: list[Telemetry] = []
    after: list[Telemetry] = []
    for i in ids:
        if i in installs:
            b, a = _split(store, i, view, installs[i].event.ts)
            before += b
            after += a
    rate0, rate1 = pooled("exit_rate", before), pooled("exit_rate", after)
    story.say("  exit rate in the agents' telemetry (share of frames that left at an early")
    story.say(f"  exit; the 1 in {PROBE_EVERY} probed at full depth count as not leaving):")
    story.say(
        f"    v{base} while the round ran: {_pct(rate0)} of {frames(before):,} frames "
        f"({len(before)} windows)"
    )
    story.say(
        f"    v{new} after the round:      {_pct(rate1)} of {frames(after):,} frames "
        f"({len(after)} windows)"
    )
    story.say("  the video's digits already leave early almost every time (step 4), so there")
    story.say(
        f"  is little to gain here: the check is 'not worse' within "
        f"{EXIT_RATE_TOLERANCE * 100:g} points"
    )
    ok = rate0 is not None and rate1 is not None and rate1 >= rate0 - EXIT_RATE_TOLERANCE
    change = (
        f"{(rate1 - rate0) * 100:+.1f} points" if rate0 is not None and rate1 is not None else "-"
    )
    checks.check(
        f"exit rate not worse after the round (within {EXIT_RATE_TOLERANCE * 100:g} points)",
        ok,
        f"v{base} {_pct(rate0)} over {len(before)} windows, v{new} {_pct(rate1)} over "
        f"{len(after)} windows ({change})",
    )
    return {
        "fed_rollout": rolled.model_dump(mode="json"),
        "transfers": transfers,
        "delta_bytes": delta.size if delta else None,
        "full_bytes": full.size if full else None,
        "exit_rate_before": rate0,
        "exit_rate_after": rate1,
        "windows_before": len(before),
        "windows_after": len(after),
    }


def _split(
    store: Store, device_id: str, view: RoundView, installed_at: float
) -> tuple[list[Telemetry], list[Telemetry]]:
    assert view.result_version is not None
    return split_windows(
        (r.telemetry for r in store.telemetry(device_id, limit=500)),
        view.model_id,
        view.base_version,
        view.result_version,
        view.created_at,
        installed_at,
    )
