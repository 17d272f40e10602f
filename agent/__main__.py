"""`edgefleet-agent` / `python -m edgefleet.agent`: the device side."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgefleet.agent import __version__
from edgefleet.agent.bundle import BundleError, KeyFileError, load_public_key, verify_bundle
from edgefleet.agent.helpformat import CliParser

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.toml")


def _verify(args: argparse.Namespace) -> int:
    keys = [load_public_key(p) for p in args.key]
    verified = verify_bundle(args.bundle, keys)
    m = verified.manifest
    print(
        f"OK {args.bundle}: {m.model_id} v{m.version}, {len(m.stages)} stage(s), "
        f"signed by {m.signer}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edgefleet.agent.config import ConfigError, load_config
    from edgefleet.agent.service import Agent, AgentError, acquire_lock

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def _stop(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        cfg = load_config(args.config)
        lock = acquire_lock(cfg.state_dir, cfg.device_id)
        try:
            return Agent(cfg, stop).run()
        finally:
            lock.close()
    except ConfigError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return exc.code


def _check(args: argparse.Namespace) -> int:
    from edgefleet.agent.check import check

    return check(args.config)


def _bench(args: argparse.Namespace) -> int:
    import json

    from edgefleet.agent.benchmark import as_json, bench_bundle, read_frames, report

    verified = verify_bundle(args.bundle, [load_public_key(p) for p in args.key])
    source: str | int = int(args.source) if args.source.isdigit() else args.source
    try:
        if args.frames < 1 or args.rounds < 1:
            raise ValueError(f"--frames and --rounds must be >= 1 (got {args.frames}, "
                             f"{args.rounds})")
        frames = read_frames(source, args.frames)
    except ValueError as exc:
        print(f"edgefleet-agent bench: error: {exc}", file=sys.stderr)
        return 1
    m = verified.manifest
    say = (lambda _m: None) if args.json else print
    say(
        f"{m.model_id} v{m.version}: {len(frames)} frames of {args.source} x {args.rounds} "
        f"round(s) per operating point, {args.threads} thread(s)"
    )
    results = bench_bundle(
        verified,
        frames,
        threads=args.threads,
        providers=args.provider or None,
        rounds=args.rounds,
        say=say,
    )
    if args.json:
        print(json.dumps(as_json(results), indent=2))
    else:
        print(report(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Commands available on a device."""
    parser = CliParser(prog="edgefleet-agent", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"edgefleet-agent {__version__}",
        help="print the package version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("verify", help="verify a bundle's signature and hashes as the device would")
    v.add_argument("bundle", type=Path, help="bundle directory")
    v.add_argument(
        "--key", type=Path, action="append", required=True,
        help="trusted public key, PEM (repeat for several)",
    )
    v.set_defaults(func=_verify)
    r = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    r.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent config (TOML)")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    r.set_defaults(func=_run)
    c = sub.add_parser("check", help="check config, bundle, camera and broker; say what is wrong")
    c.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent config (TOML)")
    c.set_defaults(func=_check)
    b = sub.add_parser(
        "bench",
        help="latency, fps and energy per frame of a bundle on this device",
        description="Time every operating point of a bundle (and all exits off) on the same "
        "decoded frames: each point over every frame once per round, the points taking turns "
        "every few frames in a rotating order, each warmed up first. Times are frame to "
        "prediction, preprocessing included, as the agent's telemetry reports them; the "
        "report says what each figure is.",
    )
    b.add_argument("bundle", type=Path, help="bundle directory")
    b.add_argument(
        "--key", type=Path, action="append", required=True,
        help="trusted public key, PEM (repeat for several)",
    )
    b.add_argument(
        "--source", required=True,
        help="video file, or camera index (0) or device path (/dev/video0)",
    )
    b.add_argument(
        "--frames", type=int, default=200,
        help="distinct frames read from the source (a short video is looped)",
    )
    b.add_argument(
        "--rounds", type=int, default=3,
        help="times each point runs over all the frames; figures are medians over rounds",
    )
    b.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    b.add_argument(
        "--provider",
        action="append",
        help="onnxruntime execution provider, in order of preference, as model.providers in "
        "agent.toml (repeat for several; default: CPUExecutionProvider)",
    )
    b.add_argument("--json", action="store_true", help="print the results as JSON only")
    b.set_defaults(func=_bench)
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
