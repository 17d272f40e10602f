"""`edgefleet-server` / `python -m server`: the coordinator process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from agent import __version__
from agent.protocol import DEFAULT_ROOT, TopicTree
from server.listen import Listener


def _listen(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener = Listener(args.host, args.port, TopicTree(args.root), lambda s: print(s, flush=True))
    listener.run(stop)
    print(f"counts: {dict(listener.counts)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Coordinator commands."""
    parser = argparse.ArgumentParser(prog="edgefleet-server", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edgefleet-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("listen", help="decode and print every device message on a broker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--root", default=DEFAULT_ROOT, help="topic root")
    p.set_defaults(func=_listen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgefleet-server` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
