"""`edgefleet keys`: create, show, rotate and revoke the fleet signing key."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle.keys import public_key_pem
from edgefleet.agent.protocol import KeyTrust, encode
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.keystore import init_key, load_key
from edgefleet.server.keytrust import (
    DEFAULT_OVERLAP_S,
    KeyRotationError,
    archived_public,
    load_chain,
    parse_overlap,
    revoke,
    rotate,
)
from edgefleet.server.paths import keys_dir

from .errors import CliError
from .fleet import _connection

KEYS_DIR_HELP = (
    "fleet key directory (default: $EDGEFLEET_HOME/keys, else "
    "$XDG_DATA_HOME/edgefleet/keys or ~/.local/share/edgefleet/keys)"
)


def register(sub: Any) -> None:
    """Add `keys init|show|rotate|revoke|publish` to the command tree."""
    p = sub.add_parser("keys", help="the fleet signing key (Ed25519)")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = ks.add_parser("init", help="create the fleet key if none exists")
    init.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    init.set_defaults(func=_init)
    show = ks.add_parser("show", help="print the key id and the public key (PEM)")
    show.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    show.set_defaults(func=_show)
    shared = [_connection(defaults=True)]
    rot = ks.add_parser(
        "rotate",
        parents=shared,
        help="new signing key; devices trust old and new for --overlap (published retained)",
        description="Make a new fleet key, sign 'trust the new key' with the old one, and have "
        "the coordinator publish the statement chain retained on keys/trust. Devices accept "
        "it by themselves; the old key stays trusted for --overlap, then devices drop it.",
    )
    rot.add_argument("--overlap", default="7d", help="how long the old key stays trusted (7d)")
    rot.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    rot.add_argument("--no-publish", action="store_true", help="only change the key directory")
    rot.set_defaults(func=_rotate)
    rev = ks.add_parser(
        "revoke",
        parents=shared,
        help="devices never trust KEY_ID again (signed by the current key)",
    )
    rev.add_argument("key_id", metavar="KEY_ID", help="16-hex key id (see `keys show`)")
    rev.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    rev.add_argument("--no-publish", action="store_true", help="only change the key directory")
    rev.set_defaults(func=_revoke)
    pub = ks.add_parser(
        "publish", parents=shared, help="publish the statement chain again (after a failure)"
    )
    pub.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    pub.set_defaults(func=_publish)


def _init(args: argparse.Namespace) -> int:
    key, created = init_key(args.dir or keys_dir())
    state = "created" if created else "exists"
    print(f"fleet key {key.id} ({state}); public key: {key.public_path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    key = load_key(args.dir or keys_dir())
    print(f"key id: {key.id}")
    print(public_key_pem(key.public).decode(), end="")
    return 0


def _send(args: argparse.Namespace, chain: KeyTrust) -> None:
    if args.no_publish:
        print("not published (--no-publish): run `edgefleet keys publish` to send it")
        return
    try:
        out = FleetClient(args.url, args.token).publish_trust(json.loads(encode(chain)))
    except ApiError as exc:
        raise CliError(f"{exc}; the key directory is changed: `edgefleet keys publish`") from None
    print(f"published {out['statements']} statements retained on {out['topic']}")


def _rotate(args: argparse.Namespace) -> int:
    directory = args.dir or keys_dir()
    try:
        overlap = parse_overlap(args.overlap) if args.overlap else DEFAULT_OVERLAP_S
        done = rotate(directory, overlap)
    except KeyRotationError as exc:
        raise CliError(str(exc)) from None
    until = dt.datetime.fromtimestamp(done.old_key_expires_at, dt.timezone.utc).isoformat(
        timespec="seconds"
    )
    print(f"fleet key {done.old_id} -> {done.new_id}; devices trust {done.old_id} until {until}")
    print(
        f"give the coordinator both public keys during the overlap: --fleet-key "
        f"{directory / 'fleet.pub'} --fleet-key {archived_public(directory, done.old_id)}"
    )
    _send(args, done.chain)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    directory = args.dir or keys_dir()
    try:
        chain = revoke(directory, args.key_id)
    except KeyRotationError as exc:
        raise CliError(str(exc)) from None
    print(f"key {args.key_id} revoked (signed by {load_key(directory).id})")
    _send(args, chain)
    return 0


def _publish(args: argparse.Namespace) -> int:
    args.no_publish = False
    try:
        chain = load_chain(args.dir or keys_dir())
    except KeyRotationError as exc:
        raise CliError(str(exc)) from None
    _send(args, chain)
    return 0
