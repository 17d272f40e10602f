"""`edgefleet-agent` / `python -m agent`: the device side."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.bundle import BundleError, KeyFileError, load_public_key, verify_bundle


def _verify(args: argparse.Namespace) -> int:
    keys = [load_public_key(p) for p in args.key]
    verified = verify_bundle(args.bundle, keys)
    m = verified.manifest
    print(
        f"OK {args.bundle}: {m.model_id} v{m.version}, {len(m.stages)} stage(s), "
        f"signed by {m.signer}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Commands available on a device."""
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", help="verify a bundle's signature and hashes as the device would")
    v.add_argument("bundle", type=Path)
    v.add_argument("--key", type=Path, action="append", required=True, help="trusted public key")
    v.set_defaults(func=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgefleet-agent` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (BundleError, KeyFileError) as exc:
        print(f"edgefleet-agent {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
