"""`edgefleet demo`: the main job of the README's first command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add `demo` to the command tree."""
    p = sub.add_parser("demo", help="run the end-to-end demo on the reference model and video")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    p.add_argument("--frames", type=int, default=None, help="limit video frames")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from edgefleet.server.demo import run_demo  # heavy imports only for this command

    run_demo(args.out, max_frames=args.frames)
    return 0
