"""`edgefleet deploy` and `edgefleet rollout`: push a signed bundle to a group, safely.

`deploy` uploads the archive (a bundle directory is packed first), creates the rollout and,
with --watch, prints every device's state as it changes until the rollout ends; its exit
status is 0 only for a completed rollout, so a script can rely on it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle import pack
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.rollout.plan import parse_duration
from edgefleet.server.rollout.views import RolloutView

from .errors import CliError
from .fleet import _connection, _dump, table

FINISHED = frozenset({"completed", "halted", "aborted"})


def register(sub: Any) -> None:
    """Add `deploy` and `rollout ls|show|pause|resume|abort`."""
    shared = [_connection(defaults=True)]
    d = sub.add_parser(
        "deploy",
        help="roll a signed bundle out to a group: canaries, soak, waves, auto-halt",
        parents=shared,
        description="Upload BUNDLE (a directory or an archive from `bundle pack`) to the "
        "coordinator and roll it out to --group: the canaries first, their telemetry watched "
        "for --soak against every --halt-if rule, then the --waves. A broken rule, or a canary "
        "that fails to install, halts the rollout and rolls the canaries back.",
    )
    d.add_argument("bundle", type=Path, help="bundle directory or .tar.gz archive")
    d.add_argument("--group", required=True, help="the group to update")
    d.add_argument("--canary", default="10%", help="canaries: a share ('10%%') or a count ('3')")
    d.add_argument("--soak", default="5m", help="how long canaries are watched (90s, 5m, 1h)")
    d.add_argument(
        "--halt-if",
        action="append",
        default=[],
        metavar="RULE",
        help="halt and roll back when the new version's telemetry breaks RULE, e.g. "
        "'p95_ms>40', 'error_rate>0.01', 'exit_rate<0.5', 'p95_ms>1.5x' (1.5 times the "
        "devices' own figure before the install); repeatable",
    )
    d.add_argument("--waves", default="100%", help="cumulative shares after the canaries")
    d.add_argument("--deadline", default="30m", help="a device not active by then has failed")
    d.add_argument(
        "--max-failed",
        type=float,
        default=0.0,
        help="share of a wave that may fail before the rollout halts (default 0)",
    )
    d.add_argument(
        "--allow-model-change",
        action="store_true",
        help="the bundle may be another model or input shape than the devices run",
    )
    d.add_argument("--watch", action="store_true", help="follow it until it ends")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_deploy)

    p = sub.add_parser(
        "rollout", help="list, follow, pause, resume or abort rollouts", parents=shared
    )
    rs = p.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    ls = rs.add_parser("ls", help="one line per rollout", parents=[_connection(False)])
    ls.add_argument("--group", help="only this group")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)
    show = rs.add_parser(
        "show", help="a rollout and each device's state", parents=[_connection(False)]
    )
    show.add_argument("rollout", help="rollout id")
    show.add_argument("--watch", action="store_true", help="follow it until it ends")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_show)
    for action, words in (
        ("pause", "send nothing new (devices under way go on)"),
        ("resume", "go on after a pause"),
        ("abort", "stop and roll back every device it activated"),
    ):
        a = rs.add_parser(action, help=words, parents=[_connection(False)])
        a.add_argument("rollout", help="rollout id")
        a.set_defaults(func=_action, action=action)


def _client(args: argparse.Namespace) -> FleetClient:
    return FleetClient(args.url, args.token)


def _archive_bytes(path: Path) -> bytes:
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="edgefleet-deploy-") as tmp:
            return pack(path, Path(tmp) / "bundle.tar.gz").read_bytes()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read bundle {path}: {exc.strerror}") from None


def _deploy(args: argparse.Namespace) -> int:
    try:
        soak_s = parse_duration(args.soak)
        deadline_s = parse_duration(args.deadline)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    client = _client(args)
    bundle = client.upload_bundle(_archive_bytes(args.bundle))
    print(
        f"uploaded {bundle.model_id} v{bundle.version} ({bundle.size} bytes, "
        f"sha256 {bundle.sha256[:12]})"
    )
    view = client.create_rollout(
        {
            "bundle_sha256": bundle.sha256,
            "group": args.group,
            "canary": args.canary,
            "soak_s": soak_s,
            "halt_if": args.halt_if,
            "waves": args.waves,
            "device_deadline_s": deadline_s,
            "max_failed": args.max_failed,
            "allow_model_change": args.allow_model_change,
        }
    )
    print(f"rollout {view.rollout_id}: {view.model_id} v{view.version} -> group {view.group}")
    if args.watch:
        view = watch(client, view.rollout_id)
    if args.json:
        _dump(view)
    return _status(view, args.watch)


def _status(view: RolloutView, waited: bool) -> int:
    if not waited:
        return 0
    return 0 if view.state == "completed" else 1


def _line(v: RolloutView) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(v.counts.items()))
    why = f" ({v.reason})" if v.reason and v.state != "running" else ""
    return f"{v.rollout_id}: {v.state}, {v.phase}: {counts}{why}"


def _print(line: str) -> None:
    print(line, flush=True)


def watch(
    client: FleetClient,
    rollout_id: str,
    poll_s: float = 1.0,
    say: Callable[[str], None] = _print,
    timeout_s: float | None = None,
) -> RolloutView:
    """Say each change of the rollout and of its devices until it is finished.

    timeout_s None waits as long as the rollout takes; else TimeoutError after it.
    """
    seen: dict[str, str] = {}
    last = ""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        view = client.rollout(rollout_id)
        line = _line(view)
        if line != last:
            say(line)
            last = line
        for d in view.devices or []:
            state = d.state
            if d.state == "downloading" and d.total:
                state = f"downloading {d.have}/{d.total}"
            if seen.get(d.device_id) != state:
                seen[d.device_id] = state
                why = f": {d.reason}" if d.reason and d.state != "active" else ""
                say(f"  {d.device_id} (wave {d.wave}): {state}{why}")
        if view.state in FINISHED and view.phase == "done":
            return view
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id} not finished after {timeout_s:g} s: {line}")
        time.sleep(poll_s)


def _ls(args: argparse.Namespace) -> int:
    views = _client(args).rollouts(args.group)
    if args.json:
        _dump(views)
        return 0
    if not views:
        print("no rollouts")
        return 0
    rows = [["ROLLOUT", "GROUP", "MODEL", "STATE", "PHASE", "DEVICES"]]
    for v in views:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(v.counts.items()))
        rows.append([v.rollout_id, v.group, f"{v.model_id}@{v.version}", v.state, v.phase, counts])
    print(table(rows))
    return 0


def _show(args: argparse.Namespace) -> int:
    client = _client(args)
    view = watch(client, args.rollout) if args.watch else client.rollout(args.rollout)
    if args.json:
        _dump(view)
        return 0
    if not args.watch:
        print(_line(view))
        rows = [["DEVICE", "WAVE", "STATE", "CHUNKS", "REASON"]]
        for d in view.devices or []:
            chunks = f"{d.have}/{d.total}" if d.total else "-"
            rows.append([d.device_id, str(d.wave), d.state, chunks, (d.reason or "")[:80]])
        print(table(rows))
    return 0


def _action(args: argparse.Namespace) -> int:
    view = _client(args).rollout_action(args.rollout, args.action)
    print(_line(view))
    return 0
