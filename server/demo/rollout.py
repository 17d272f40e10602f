"""The demo's rollouts: the optimized bundle pushed to the running agents through a canary,
then a bad bundle that installs cleanly but breaks a halt rule, halted and rolled back.

Both go through the coordinator's API exactly as `edgefleet deploy ... --watch` does, and the
story shows the rollout's and each device's states as they change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle import Metrics, pack, verify_bundle
from edgefleet.server.bundles.plain import plain_body, write_plain_bundle
from edgefleet.server.cli.rollout import watch
from edgefleet.server.demo.checks import Checks
from edgefleet.server.demo.console import Story
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.waiting import poll_until
from edgefleet.server.reference import MODEL_PATH, reference_preprocessing
from edgefleet.server.rollout.views import RolloutView

GROUP = "demo"
SOAK_S = 10  # five telemetry windows of the canary on the new version
ROLLOUT_TIMEOUT_S = 180
GOOD_RULES = ["p95_ms>50", "error_rate>0.01"]
# The bad bundle is the fp32 model without early exits: it loads, passes its health check and
# runs, but no frame leaves early any more. Only a rule on the model's own telemetry sees it.
BAD_RULES = ["exit_rate<0.3", "p95_ms>50"]
DIGITS = [str(i) for i in range(10)]


def _deploy(
    client: FleetClient,
    bundle: Path,
    label: str,
    rules: list[str],
    story: Story,
) -> RolloutView:
    """Upload, create a rollout with one canary, and follow it to its end."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        uploaded = client.upload_bundle(pack(bundle, Path(tmp) / "bundle.tar.gz").read_bytes())
    halts = " ".join(f"--halt-if '{r}'" for r in rules)
    story.say(
        f"$ edgefleet deploy {label} --group {GROUP} --canary 1 --soak {SOAK_S}s {halts} --watch"
    )
    view = client.create_rollout(
        {
            "bundle_sha256": uploaded.sha256,
            "group": GROUP,
            "canary": "1",
            "soak_s": SOAK_S,
            "halt_if": rules,
            "waves": "100%",
            "device_deadline_s": 120,
        }
    )
    return watch(
        client,
        view.rollout_id,
        poll_s=0.5,
        say=lambda line: story.say("  " + line),
        timeout_s=ROLLOUT_TIMEOUT_S,
    )


def _running(client: FleetClient, ids: list[str]) -> dict[str, str | None]:
    return {d.device_id: d.bundle_sha256 for d in client.devices() if d.device_id in ids}


def bad_bundle(out: Path, key: FleetKey, version: int) -> Path:
    """The original fp32 model signed as a newer version: valid, healthy, no early exits."""
    body = plain_body(
        MODEL_PATH,
        model_id="mnist-cnn",
        version=version,
        preprocessing=reference_preprocessing(),
        labels=DIGITS,
        metrics=Metrics(),
        calibration="none (fp32)",
    )
    write_plain_bundle(out, body, MODEL_PATH, key)
    return out


def run_rollouts(
    client: FleetClient,
    ids: list[str],
    good: Path,
    key: FleetKey,
    out: Path,
    story: Story,
    checks: Checks,
) -> dict[str, Any]:
    """Push the optimized bundle, then a bad one; check what every agent runs after each."""
    good_sha = verify_bundle(good, [key.public]).manifest_sha256
    story.say("pushing the INT8 early-exit bundle to the agents: one canary first, watched")
    story.say(f"  for {SOAK_S} s against the halt rules, then the rest of the group")
    try:
        first = _deploy(client, good, "mnist-cnn-int8-exits", GOOD_RULES, story)
    except TimeoutError as exc:
        checks.check("INT8 early-exit bundle rolled out to every agent", False, str(exc))
        return {"rollout": None}
    on_good = poll_until(lambda: set(_running(client, ids).values()) == {good_sha}, 20)
    running = _running(client, ids)
    checks.check(
        "INT8 early-exit bundle rolled out to every agent",
        first.state == "completed" and first.counts.get("active") == len(ids) and on_good,
        f"rollout {first.rollout_id} {first.state}: {first.counts}; running "
        + ", ".join(f"{d}: {(sha or '-')[:12]}" for d, sha in sorted(running.items())),
    )
    result: dict[str, Any] = {"rollout": first.model_dump(mode="json")}

    version = verify_bundle(good, [key.public]).manifest.version + 1
    bad = bad_bundle(out / "bad-bundle", key, version)
    story.say(f"a bad bundle: the fp32 model signed as v{version}; it installs and runs, but")
    story.say("  without early exits: the halt rule on the exit rate must stop it")
    try:
        second = _deploy(client, bad, f"mnist-cnn-fp32-v{version}", BAD_RULES, story)
    except TimeoutError as exc:
        checks.check("bad bundle halted by its halt rule", False, str(exc))
        return result
    devices = second.devices or []
    canaries = [d for d in devices if d.wave == 0]
    others = [d for d in devices if d.wave > 0]
    checks.check(
        "bad bundle halted by its halt rule",
        second.state == "halted" and "exit_rate" in (second.reason or ""),
        f"rollout {second.rollout_id} {second.state}: {second.reason}",
    )
    checks.check(
        "its canary rolled back, no other agent downloaded it",
        all(d.state == "rolled_back" for d in canaries)
        and all(d.state == "pending" for d in others),
        ", ".join(f"{d.device_id} (wave {d.wave}): {d.state}" for d in devices),
    )
    back = poll_until(lambda: set(_running(client, ids).values()) == {good_sha}, 30)
    checks.check(
        "every agent back on the INT8 bundle",
        back,
        ", ".join(f"{d}: {(sha or '-')[:12]}" for d, sha in sorted(_running(client, ids).items())),
    )
    result["bad_rollout"] = second.model_dump(mode="json")
    return result
