"""`edgefleet keys`: create and show the fleet signing key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle.keys import public_key_pem
from edgefleet.server.keystore import init_key, load_key
from edgefleet.server.paths import keys_dir

KEYS_DIR_HELP = (
    "fleet key directory (default: $EDGEFLEET_HOME/keys, else "
    "$XDG_DATA_HOME/edgefleet/keys or ~/.local/share/edgefleet/keys)"
)


def register(sub: Any) -> None:
    """Add `keys init|show` to the command tree."""
    p = sub.add_parser("keys", help="the fleet signing key (Ed25519)")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = ks.add_parser("init", help="create the fleet key if none exists")
    init.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    init.set_defaults(func=_init)
    show = ks.add_parser("show", help="print the key id and the public key (PEM)")
    show.add_argument("--dir", type=Path, default=None, help=KEYS_DIR_HELP)
    show.set_defaults(func=_show)


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
