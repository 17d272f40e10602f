"""`edgefleet`: the operator's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from edgefleet.agent.bundle import BundleError, KeyFileError
from edgefleet.server.fleet.client import ApiError

from . import bundle, demo, fleet, keys, optimize, simulate


class CliError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The full command tree; each module adds its own subcommands."""
    parser = argparse.ArgumentParser(prog="edgefleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys.register(sub)
    bundle.register(sub)
    optimize.register(sub)
    demo.register(sub)
    fleet.register(sub)
    simulate.register(sub)
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
