"""The `edgefleet` command tree: wires the subcommand modules into one parser and runs it.

Imports run one way: this module imports every subcommand module (keys, bundle, optimize, demo,
fleet, identity, simulate, rollout, fl, group, models); they import only errors.py (and
fleet.py's shared helpers) from this package, never this module or the package itself.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edgefleet.agent import __version__
from edgefleet.agent.bundle import BundleError, KeyFileError
from edgefleet.agent.helpformat import CliParser
from edgefleet.server.fleet.client import ApiError

from . import bundle, demo, fl, fleet, group, identity, keys, models, optimize, rollout, simulate
from .errors import CliError

DESCRIPTION = "edgefleet: the operator's command line (keys, bundles, optimizer, fleet)."


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; each module adds its own subcommands."""
    parser = CliParser(prog="edgefleet", description=DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"edgefleet {__version__}",
        help="print the package version and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys.register(sub)
    bundle.register(sub)
    optimize.register(sub)
    demo.register(sub)
    identity.register(fleet.register(sub))  # provision/revoke act on the broker, not the API
    simulate.register(sub)
    rollout.register(sub)
    fl.register(sub)
    group.register(sub)
    models.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgefleet` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (
        CliError, ApiError, BundleError, KeyFileError, FileNotFoundError, ValueError
    ) as exc:
        print(f"edgefleet {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
