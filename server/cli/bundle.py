"""`edgefleet bundle`: verify, inspect and pack signed model bundles."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefleet.agent.bundle import VerifiedBundle, load_public_key, pack, verify_bundle
from edgefleet.server.keystore import PUBLIC_NAME
from edgefleet.server.paths import keys_dir

KEY_HELP = (
    "trusted public key, PEM (repeat for several; default: the fleet key, "
    f"$EDGEFLEET_HOME/keys/{PUBLIC_NAME})"
)


def register(sub: Any) -> None:
    """Add `bundle verify|pack` to the command tree."""
    p = sub.add_parser("bundle", help="signed model bundles")
    bs = p.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    verify = bs.add_parser("verify", help="check signature and hashes, print a summary")
    verify.add_argument("path", type=Path, help="bundle directory")
    verify.add_argument("--key", type=Path, action="append", help=KEY_HELP)
    verify.set_defaults(func=_verify)
    packp = bs.add_parser("pack", help="verify, then write one .tar.gz for transfer")
    packp.add_argument("path", type=Path, help="bundle directory")
    packp.add_argument("archive", type=Path, help="archive to write (.tar.gz)")
    packp.add_argument("--key", type=Path, action="append", help=KEY_HELP)
    packp.set_defaults(func=_pack)


def _verified(args: argparse.Namespace) -> VerifiedBundle:
    paths = args.key or [keys_dir() / PUBLIC_NAME]
    return verify_bundle(args.path, [load_public_key(p) for p in paths])


def summary(verified: VerifiedBundle) -> str:
    """A few lines an operator reads to know what a bundle is."""
    m = verified.manifest
    lines = [
        f"{m.model_id} v{m.version}: signed by {m.signer}, "
        f"manifest sha256 {verified.manifest_sha256}",
        f"  input {m.input.name} {m.input.shape} {m.input.dtype}; "
        f"{m.preprocessing.color} {m.preprocessing.height}x{m.preprocessing.width} "
        f"{m.preprocessing.layout}; {len(m.labels)} classes",
        f"  {len(m.stages)} stage(s), early exits after stage(s) {m.early_exits or 'none'}",
    ]
    for i, op in enumerate(m.operating_points):
        mark = "*" if i == m.default_operating_point else " "
        lines.append(f"  {mark} operating point {i} {op.name}: thresholds {op.thresholds}")
    total = sum(f.size for f in m.files.values())
    lines.append(f"  {len(m.files)} file(s), {total / 1024:.1f} KiB")
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    print("OK " + summary(_verified(args)))
    return 0


def _pack(args: argparse.Namespace) -> int:
    _verified(args)
    pack(args.path, args.archive)
    print(f"wrote {args.archive}")
    return 0
