"""`edgefleet fleet`: the operator's view of the fleet, through the coordinator's HTTP API."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edgefleet.server.fleet.client import DEFAULT_URL, TOKEN_ENV, URL_ENV, FleetClient
from edgefleet.server.fleet.views import DeviceDetail, DeviceView, object_events


class _Error(Exception):
    pass


def _connection(defaults: bool) -> argparse.ArgumentParser:
    """--url and --token, for `fleet` itself and (as a parent) for each of its actions.

    The actions' copies default to SUPPRESS: given after the action they win, left out they
    leave what was given before the action (or the group's default None) in place.
    """
    p = argparse.ArgumentParser(add_help=False)
    default = None if defaults else argparse.SUPPRESS
    p.add_argument(
        "--url",
        default=default,
        help=f"coordinator API (default: ${URL_ENV}, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--token",
        default=default,
        help=f"API token for actions (default: ${TOKEN_ENV})",
    )
    return p


def register(sub: Any) -> Any:
    """Add `fleet ls|show|groups|register|assign|cmd`; return the actions for other modules."""
    p = sub.add_parser(
        "fleet",
        help="devices, groups and commands (via the coordinator)",
        parents=[_connection(defaults=True)],
        description="The fleet as the coordinator sees it. --url and --token may come before "
        "or after the action.",
    )
    fs = p.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    shared = [_connection(defaults=False)]

    ls = fs.add_parser("ls", help="one line per device", parents=shared)
    ls.add_argument("--group", help="only this group (default: all)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_ls)

    show = fs.add_parser("show", help="a device's recent windows and events", parents=shared)
    show.add_argument("device", help="device id")
    show.add_argument("--windows", type=int, default=10, help="telemetry windows to show")
    show.add_argument("--events", type=int, default=10, help="events to show")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_show)

    groups = fs.add_parser("groups", help="groups and their sizes", parents=shared)
    groups.add_argument("--json", action="store_true", help="machine-readable output")
    groups.set_defaults(func=_groups)

    reg = fs.add_parser(
        "register",
        help="admit a device before it connects (for --closed-registration)",
        parents=shared,
    )
    reg.add_argument("device", help="device id")
    reg.add_argument("--group", help="put it in this group")
    reg.set_defaults(func=_register)

    assign = fs.add_parser(
        "assign", help="put a device in a group ('-' removes it)", parents=shared
    )
    assign.add_argument("device", help="device id")
    assign.add_argument("group", help="group name, or '-' for none")
    assign.set_defaults(func=_assign)

    cmd = fs.add_parser(
        "cmd",
        help="send a command and print the replies",
        description="Examples: `fleet cmd cam-01 ping`, "
        "`fleet cmd --group lobby set_operating_point index=2 pin=true`, "
        "`fleet cmd cam-01 snapshot --out frame.jpg`.",
        parents=shared,
    )
    cmd.add_argument("device", nargs="?", help="target device (or use --group)")
    cmd.add_argument("--group", help="target every device of this group")
    cmd.add_argument("name", help="command name, e.g. ping, set_operating_point, snapshot")
    cmd.add_argument("args", nargs="*", metavar="KEY=VALUE", help="command fields (JSON values)")
    cmd.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for replies")
    cmd.add_argument("--out", type=Path, help="snapshot: write the JPEG here")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.set_defaults(func=_cmd)
    return fs


def _client(args: argparse.Namespace) -> FleetClient:
    return FleetClient(args.url, args.token)


def _ago(ts: float) -> str:
    s = max(0.0, time.time() - ts)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.0f}h ago"


def _clock(ts: float, fmt: str) -> str:
    """ts as local time, or the raw number when no calendar holds it (issue 12: 1e308)."""
    try:
        return time.strftime(fmt, time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"t={ts:.6g}"


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _dump(obj: BaseModel | list[Any]) -> None:
    if isinstance(obj, list):
        print(json.dumps([o.model_dump(mode="json") for o in obj], indent=2))
    else:
        print(obj.model_dump_json(indent=2))


# What the table's columns and marks mean, printed under it.
LEGEND = (
    "OP: operating point, the early-exit setting a device runs (0 = most accurate)",
    "~ after a power figure: estimated from CPU load (the device has no power meter)",
)


def legend(devices: list[DeviceView]) -> list[str]:
    """The legend lines that the table of these devices needs."""
    estimated = any(d.power_w is not None and d.power_source == "estimate" for d in devices)
    return [LEGEND[0], *LEGEND[1:] * estimated]


def device_rows(devices: list[DeviceView]) -> list[list[str]]:
    """The `fleet ls` table, header first."""
    rows = [["DEVICE", "GROUP", "ONLINE", "MODEL", "OP", "FPS", "P95", "POWER", "TEMP",
             "LAST SEEN"]]
    for d in devices:
        model = f"{d.model_id}@{d.model_version}" if d.model_id else "-"
        power = _fmt(d.power_w, ".1f", "W")
        if d.power_w is not None and d.power_source == "estimate":
            power += "~"  # an estimate from CPU load, not a meter
        rows.append([
            d.device_id,
            d.group or "-",
            "yes" if d.online else "no",
            model,
            _fmt(d.operating_point, "d"),
            _fmt(d.fps, ".1f"),
            _fmt(d.p95_ms, ".1f", "ms"),
            power,
            _fmt(d.temperature_c, ".0f", "C"),
            _ago(d.last_seen),
        ])
    return rows


def _ls(args: argparse.Namespace) -> int:
    devices = _client(args).devices(args.group)
    if args.json:
        _dump(devices)
    elif not devices:
        print("no devices")
    else:
        print(table(device_rows(devices)))
        online = sum(d.online for d in devices)
        print(f"{len(devices)} devices, {online} online")
        for line in legend(devices):
            print(line)
    return 0


def _show_text(d: DeviceDetail) -> str:
    v = d.device
    lines = [table(device_rows([v]))]
    if d.sequence is not None:
        s = d.sequence
        lines.append(
            f"telemetry seq {s.first_seq}..{s.max_seq}: received {s.received}, "
            f"missing {s.missing}, lost {s.lost}, dropped {s.dropped}, "
            f"duplicates {s.duplicates}, device reported dropping {s.reported_overflow}"
        )
    if d.windows:
        rows = [["SEQ", "END", "FPS", "P50", "P95", "P99", "EXITS", "OP", "CPU", "POWER",
                 "mJ/FRAME"]]
        for w in d.windows:
            t = w.telemetry
            rows.append([
                str(w.seq),
                _clock(t.window_end, "%H:%M:%S"),
                f"{t.fps:.1f}",
                f"{t.latency_ms.p50:.1f}",
                f"{t.latency_ms.p95:.1f}",
                f"{t.latency_ms.p99:.1f}",
                "/".join(map(str, t.exit_histogram)),
                str(t.operating_point),
                f"{t.cpu_percent:.0f}%",
                _fmt(t.power_w, ".2f", "W"),
                _fmt(t.energy_per_frame_mj, ".1f"),
            ])
        lines += ["", table(rows)]
    objects = object_events(d.events)
    if objects:
        rows = [["SEQ", "EVENT", "CLASS", "TRACK", "START", "DURATION", "FRAMES", "SCORE",
                 "BOX (x1,y1,x2,y2 px)", "ZONE"]]
        for o in objects:
            rows.append([
                str(o.seq),
                o.kind.removeprefix("object_"),
                o.label or "-",
                _fmt(o.track_id, "d"),
                _clock(o.start_ts, "%H:%M:%S") if o.start_ts is not None else "-",
                _fmt(o.duration_s, ".1f", "s"),
                _fmt(o.frames, "d"),
                _fmt(o.score, ".2f"),
                ",".join(f"{v:.0f}" for v in o.box) if o.box else "-",
                o.zone or "-",
            ])
        lines += ["", "objects:", table(rows)]
    if d.events:
        lines.append("")
        for e in d.events:
            ev = e.event
            stamp = _clock(ev.ts, "%Y-%m-%d %H:%M:%S")
            lines.append(f"{stamp}  #{ev.seq} {ev.level:<7} {ev.kind}: {ev.message}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    from edgefleet.server.retune.client import LoopClient
    from edgefleet.server.retune.views import decision_lines

    detail = _client(args).device(args.device, args.windows, args.events)
    if args.json:
        _dump(detail)
        return 0
    print(_show_text(detail))
    decisions = LoopClient(args.url, args.token).decisions(device=args.device, limit=args.events)
    if decisions:
        print("\nclosed loop:")
        print("\n".join(decision_lines(decisions)))
    return 0


def _groups(args: argparse.Namespace) -> int:
    groups = _client(args).groups()
    if args.json:
        _dump(groups)
    else:
        print(table([["GROUP", "DEVICES"], *([g.group, str(g.devices)] for g in groups)]))
    return 0


def _register(args: argparse.Namespace) -> int:
    view = _client(args).register(args.device, args.group)
    print(f"{view.device_id}: registered, group {view.group or '-'}")
    return 0


def _assign(args: argparse.Namespace) -> int:
    view = _client(args).assign_group(args.device, None if args.group == "-" else args.group)
    print(f"{view.device_id}: group {view.group or '-'}")
    return 0


def parse_fields(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, values parsed as JSON when they are JSON (2, true, [0.9, null])."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise _Error(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _cmd(args: argparse.Namespace) -> int:
    if (args.device is None) == (args.group is None):
        print("edgefleet fleet cmd: error: give a DEVICE or --group G", file=sys.stderr)
        return 2
    try:
        fields = parse_fields(args.args)
    except _Error as exc:
        print(f"edgefleet fleet cmd: error: {exc}", file=sys.stderr)
        return 2
    outcome = _client(args).command(
        {"name": args.name, **fields}, device=args.device, group=args.group,
        timeout_s=args.timeout,
    )
    if args.json:
        _dump(outcome)
    else:
        for r in outcome.replies:
            state = "ok" if r.ok else f"error: {r.error}"
            extra = ""
            if r.result and "jpeg_b64" not in r.result:
                extra = " " + json.dumps(r.result)
            print(f"{r.device_id}: {state}{extra}")
        for d in outcome.missing:
            print(f"{d}: no reply within {args.timeout:g}s")
    if args.out is not None:
        for r in outcome.replies:
            if r.result and isinstance(r.result.get("jpeg_b64"), str):
                args.out.write_bytes(base64.b64decode(str(r.result["jpeg_b64"])))
                print(f"snapshot of {r.device_id} written to {args.out}")
                break
    return 0 if not outcome.missing and all(r.ok for r in outcome.replies) else 1

