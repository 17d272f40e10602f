"""`edgefleet simulate`: a fleet of simulated devices against a real broker."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from edgefleet.agent.protocol import DEFAULT_ROOT

from .errors import CliError


def register(sub: Any) -> None:
    """Add `simulate` to the command tree."""
    p = sub.add_parser(
        "simulate",
        help="simulate N devices, each with its own MQTT connection (benchmarks, demos)",
        description=(
            "Connect N simulated agents to a broker, each publishing telemetry windows with "
            "per-device sequence numbers, birth and Last Will, and answering commands. "
            "Progress goes to stderr; the summary (or --json) to stdout."
        ),
    )
    p.add_argument("--devices", type=int, required=True, help="number of simulated devices")
    p.add_argument(
        "--rate", type=float, required=True, help="telemetry windows per second per device"
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)"
    )
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--root", default=DEFAULT_ROOT, help="topic root")
    p.add_argument(
        "--prefix", default="sim", help="device ids are PREFIX-00000, PREFIX-00001, ..."
    )
    p.add_argument("--group", default=None, help="group whose commands the devices obey")
    p.add_argument(
        "--events-every", type=int, default=50, help="one event per this many windows (0: none)"
    )
    p.add_argument(
        "--backlog-limit",
        type=int,
        default=10_000,
        help="windows a device keeps while offline; more are counted as overflow",
    )
    p.add_argument("--connect-rate", type=float, default=400.0, help="new connections per second")
    p.add_argument(
        "--loss-burst",
        action="store_true",
        help="every few seconds take a random 10%% of the devices offline for a few seconds",
    )
    p.add_argument("--procs", type=int, default=1, help="processes to spread the devices over")
    p.add_argument(
        "--progress-every", type=float, default=2.0, help="seconds between progress lines (stderr)"
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    # Only this command needs the simulator (paho, multiprocessing): `edgefleet --help` skips it.
    from edgefleet.server.fleet.simulate import Progress, SimConfig, run_simulation

    cfg = SimConfig(
        host=args.host,
        port=args.port,
        devices=args.devices,
        rate=args.rate,
        root=args.root,
        prefix=args.prefix,
        group=args.group,
        events_every=args.events_every,
        backlog_limit=args.backlog_limit,
        connect_rate=args.connect_rate,
    )
    if args.duration is not None and args.duration <= 0:
        raise CliError(f"--duration must be > 0, got {args.duration}")

    def show(p: Progress) -> None:
        print(
            f"simulate: {p.elapsed_s:6.1f} s  online {p.online}/{p.devices}  "
            f"produced {p.produced}  acked {p.acked}  backlog {p.backlog}",
            file=sys.stderr,
            flush=True,
        )

    stop = threading.Event()
    try:
        report = run_simulation(
            cfg,
            args.duration,
            procs=args.procs,
            loss_burst=args.loss_burst,
            progress=show,
            progress_every=args.progress_every,
            stop=stop,
        )
    except (TimeoutError, OSError, RuntimeError) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        lost = report.produced - report.acked - report.overflow - report.backlog
        print(
            f"{report.devices} devices in {report.procs} process(es), "
            f"connected in {report.connect_s:.1f} s\n"
            f"measured {report.duration_s:.1f} s: {report.publish_rate:.0f} windows/s acked, "
            f"{report.produce_rate:.0f} windows/s produced\n"
            f"total: produced {report.produced}, acked {report.acked}, "
            f"overflow {report.overflow}, backlog {report.backlog}, unaccounted {lost}\n"
            f"reconnects {report.reconnects}, loss bursts {report.offline_bursts} "
            f"({report.taken_offline} device outages), drained {report.drained}"
        )
    return 0
