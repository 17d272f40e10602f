"""`edgefleet group set|show|ls`: latency targets per group and what the closed loop did."""

from __future__ import annotations

import argparse
from typing import Any

from edgefleet.server.retune.client import LoopClient
from edgefleet.server.retune.views import GroupLoopView, decision_lines

from .errors import CliError
from .fleet import _connection, _dump, table


def register(sub: Any) -> None:
    """Add `group set|show|ls`."""
    p = sub.add_parser(
        "group",
        help="latency targets per group; the closed loop that keeps each group on them",
        parents=[_connection(defaults=True)],
        description="A group's target (p95 latency, accuracy floor, power ceiling) and the "
        "closed loop that moves its devices to the most accurate variant meeting it "
        "(docs/closedloop.md).",
    )
    gs = p.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    shared = [_connection(defaults=False)]

    s = gs.add_parser("set", help="set or change a group's target", parents=shared)
    s.add_argument("group", help="the group (devices join it by their config or `fleet assign`)")
    s.add_argument("--p95-ms", type=float, help="p95 latency target in ms (needed the first time)")
    s.add_argument(
        "--min-accuracy", type=float, help="validation accuracy floor, e.g. 0.97 ('none' to drop)"
    )
    s.add_argument("--max-power-w", type=float, help="power ceiling in W")
    s.add_argument("--loop", choices=["on", "off"], help="off: the loop changes nothing here")
    s.add_argument("--pin-variant", help="keep the group on this variant ('none' to unpin)")
    s.add_argument("--no-min-accuracy", action="store_true", help="drop the accuracy floor")
    s.add_argument("--no-max-power", action="store_true", help="drop the power ceiling")
    s.set_defaults(func=_set)

    sh = gs.add_parser("show", help="target, devices against it, decisions", parents=shared)
    sh.add_argument("group", help="the group to show")
    sh.add_argument("--decisions", type=int, default=20, help="newest decisions shown")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(func=_show)

    ls = gs.add_parser("ls", help="every group with a target", parents=shared)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)


def _client(args: argparse.Namespace) -> LoopClient:
    return LoopClient(args.url, args.token)


def _set(args: argparse.Namespace) -> int:
    change: dict[str, Any] = {}
    if args.p95_ms is not None:
        change["p95_ms"] = args.p95_ms
    if args.min_accuracy is not None:
        change["min_accuracy"] = args.min_accuracy
    if args.max_power_w is not None:
        change["max_power_w"] = args.max_power_w
    if args.loop is not None:
        change["loop"] = args.loop == "on"
    if args.pin_variant is not None:
        if args.pin_variant == "none":
            change["unpin_variant"] = True
        else:
            change["pin_variant"] = args.pin_variant
    if args.no_min_accuracy:
        change["clear_accuracy"] = True
    if args.no_max_power:
        change["clear_power"] = True
    if not change:
        raise CliError("nothing to set: give --p95-ms, --min-accuracy, --loop ...")
    t = _client(args).set_target(args.group, change)
    print(_target_line(t.group, t.p95_ms, t.min_accuracy, t.max_power_w, t.loop, t.pinned_variant))
    return 0


def _target_line(
    group: str, p95: float, acc: float | None, power: float | None, loop: bool, pin: str | None
) -> str:
    parts = [f"group {group}: p95 <= {p95:g} ms"]
    if acc is not None:
        parts.append(f"accuracy >= {acc:g}")
    if power is not None:
        parts.append(f"power <= {power:g} W")
    parts.append(f"loop {'on' if loop else 'off'}")
    if pin:
        parts.append(f"pinned to {pin}")
    return ", ".join(parts)


def _show_text(v: GroupLoopView) -> str:
    if v.target is None:
        head = f"group {v.group}: no target (edgefleet group set {v.group} --p95-ms MS)"
    else:
        t = v.target
        head = _target_line(t.group, t.p95_ms, t.min_accuracy, t.max_power_w, t.loop,
                            t.pinned_variant)
    lines = [head, f"{v.devices} device(s) online, {v.out_of_target} over target, "
             f"{v.pending} change(s) under way"]
    if v.p95_ms:
        rows = [["DEVICE", "P95 (running)"]]
        rows += [[k, f"{ms:.1f}"] for k, ms in sorted(v.p95_ms.items())]
        lines += ["", table(rows)]
    if v.decisions:
        lines += ["", *decision_lines(v.decisions)]
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    view = _client(args).group_loop(args.group, args.decisions)
    if args.json:
        _dump(view)
    else:
        print(_show_text(view))
    return 0


def _ls(args: argparse.Namespace) -> int:
    views = _client(args).loops()
    if args.json:
        _dump(views)
        return 0
    if not views:
        print("no group has a target (edgefleet group set GROUP --p95-ms MS)")
        return 0
    rows = [["GROUP", "P95 TARGET", "MIN ACC", "LOOP", "PINNED", "DEVICES", "OVER"]]
    for v in views:
        t = v.target
        if t is None:
            continue
        rows.append([
            v.group, f"{t.p95_ms:g} ms", "-" if t.min_accuracy is None else f"{t.min_accuracy:g}",
            "on" if t.loop else "off", t.pinned_variant or "-", str(v.devices),
            str(v.out_of_target),
        ])
    print(table(rows))
    return 0
