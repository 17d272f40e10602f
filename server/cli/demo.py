"""`edgefleet demo`: the main job of the README's first command."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add `demo` to the command tree."""
    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on the reference model and video",
        description="Runs the whole path on this machine and checks it: exit status 0 when "
        "every check passed, 1 otherwise. The story goes to stdout, every log record to "
        "OUT/demo.log.",
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    p.add_argument("--frames", type=int, default=None, help="limit video frames")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the optimizer, onnx and the coordinator load slowly, and
    # every other command would pay for them.
    from edgefleet.server.demo.console import LOG_NAME, log_to_file
    from edgefleet.server.demo.story import run_demo

    log_to_file(args.out / LOG_NAME)
    result = run_demo(args.out, max_frames=args.frames)
    return 0 if result.checks.passed else 1
