"""`edgefleet fleet provision|revoke`: broker credentials, one per device and per coordinator.

These act on the broker's identity directory on this host (not through the coordinator's API):
they are run where the broker runs, by whoever may change its password file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from edgefleet.agent.protocol.topics import DEFAULT_ROOT
from edgefleet.server.identity import COORDINATOR, IdentityDir, Issued, ReloadError, reload_broker
from edgefleet.server.identity.files import write_private
from edgefleet.server.identity.reload import DEFAULT_PID_FILE
from edgefleet.server.paths import home

from .errors import CliError

DIR_ENV = "EDGEFLEET_BROKER_DIR"


def default_dir() -> Path:
    """$EDGEFLEET_BROKER_DIR, else the broker/ folder of the coordinator's state directory."""
    env = os.environ.get(DIR_ENV)
    return Path(env) if env else home() / "broker"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir", type=Path, default=None,
        help=f"broker identity directory (default: ${DIR_ENV}, else $EDGEFLEET_HOME/broker); "
        "deploy/mosquitto/edgefleet.conf expects /etc/mosquitto/edgefleet",
    )  # fmt: skip
    p.add_argument("--topic-root", default=DEFAULT_ROOT, help="topic tree the ACL covers")
    p.add_argument(
        "--pid-file", type=Path, default=DEFAULT_PID_FILE,
        help=f"reload the broker with this pid file (default: {DEFAULT_PID_FILE})",
    )  # fmt: skip
    p.add_argument("--no-reload", action="store_true", help="only write the files")


def register(fleet_actions: Any) -> None:
    """Add `provision` and `revoke` to the `fleet` actions."""
    prov = fleet_actions.add_parser(
        "provision",
        help="issue a device (or the coordinator) its own broker credential",
        description="Adds NAME to the broker's password file and ACL and prints its password "
        "once (or writes it to --out, the agent's mqtt-password credential file). The first "
        "call creates the fleet's broker CA and server certificate. Again on a known NAME: "
        "changes its group and keeps its password, unless --rotate.",
    )
    prov.add_argument("name", nargs="?", help="device id (with --coordinator: default "
                      f"{COORDINATOR!r})")  # fmt: skip
    prov.add_argument("--group", help="the device's group: it may read that group's commands")
    prov.add_argument(
        "--coordinator", action="store_true",
        help="a coordinator identity: publishes commands, offers and rounds; reads every device",
    )  # fmt: skip
    prov.add_argument("--rotate", action="store_true", help="issue a new password")
    prov.add_argument("--out", type=Path, help="write the password here (mode 0600), not stdout")
    prov.add_argument(
        "--host", action="append", default=None,
        help="first call only: a name or address devices reach the broker by (repeatable; "
        "default: this host's names and loopback)",
    )  # fmt: skip
    _common(prov)
    prov.set_defaults(func=_provision)

    rev = fleet_actions.add_parser(
        "revoke",
        help="remove a broker credential and reload the broker (disconnects it at once)",
    )
    rev.add_argument("name", help="device id or coordinator name")
    _common(rev)
    rev.set_defaults(func=_revoke)


def _identity_dir(args: argparse.Namespace) -> IdentityDir:
    return IdentityDir(args.dir or default_dir(), root=args.topic_root)


def _reload(args: argparse.Namespace) -> str | None:
    """Reload the broker unless told not to; the problem, if it could not be reloaded."""
    if args.no_reload:
        return None
    try:
        pid = reload_broker(args.pid_file)
    except ReloadError as exc:
        return str(exc)
    print(f"broker (pid {pid}) reloaded")
    return None


def _provision(args: argparse.Namespace) -> int:
    if args.coordinator and args.group:
        raise CliError("--coordinator and --group exclude each other")
    name = args.name or (COORDINATOR if args.coordinator else None)
    if name is None:
        raise CliError("name a device to provision (or use --coordinator)")
    ids = _identity_dir(args)
    ids.init(hosts=args.host)
    issued = ids.provision(
        name, role="coordinator" if args.coordinator else "device",
        group=args.group, rotate=args.rotate,
    )  # fmt: skip
    _report(issued, args.out)
    problem = _reload(args)
    if problem:
        # Provisioning often comes before the broker runs; it reads the files when it starts.
        print(f"warning: not reloaded: {problem}", file=sys.stderr)
    return 0


def _report(issued: Issued, out: Path | None) -> None:
    role = issued.role + (f" in group {issued.group}" if issued.group else "")
    print(f"{issued.username}: {role}; broker CA for the device: {issued.ca}")
    if issued.password is None:
        print("password unchanged (use --rotate for a new one)")
        return
    if out is not None:
        write_private(out, issued.password + "\n")
        print(f"password written to {out} (mode 0600); it is not stored anywhere else")
    else:
        print(f"password: {issued.password}")
        print("(shown once, not stored: put it in the device's "
              "/etc/edgefleet/credentials/mqtt-password)")  # fmt: skip


def _revoke(args: argparse.Namespace) -> int:
    ids = _identity_dir(args)
    ident = ids.revoke(args.name)
    print(f"{args.name}: {ident.role} credential removed from {ids.directory}")
    problem = _reload(args)
    if problem:
        # Until the broker reloads, the revoked client may still connect: that is a failure.
        raise CliError(f"{args.name} is still accepted by the running broker: {problem}")
    return 0
