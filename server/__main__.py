"""`edgefleet-server` / `python -m edgefleet.server`: the coordinator process."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from edgefleet.agent import __version__
from edgefleet.agent.helpformat import CliParser
from edgefleet.agent.protocol import DEFAULT_ROOT, TopicTree
from edgefleet.server.listen import Listener

TOKEN_ENV = "EDGEFLEET_API_TOKEN"


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


def _read_token(path: str | None) -> str | None:
    """The API token: --token-file, then systemd's credential, then the environment."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if path is None and cred_dir and (Path(cred_dir) / "api-token").is_file():
        path = str(Path(cred_dir) / "api-token")
    if path is not None:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _read_mqtt_password(path: str | None) -> str | None:
    """The coordinator's broker password: --mqtt-password-file, else the systemd credential."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if path is None and cred_dir and (Path(cred_dir) / "mqtt-password").is_file():
        path = str(Path(cred_dir) / "mqtt-password")
    if path is None:
        return None
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"--mqtt-password-file {path}: {exc.strerror or exc}") from None
    if not password:
        raise ValueError(f"--mqtt-password-file {path}: the file is empty")
    return password


def _broker_ca(path: Path | None) -> str | None:
    """--broker-ca as a readable file's path, or ValueError naming the option."""
    if path is None:
        return None
    if not path.is_file():
        raise ValueError(f"--broker-ca {path}: no such file")
    return str(path)


def _host_port(value: str, option: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty for 127.0.0.1), or ValueError naming the option."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{option} {value!r}: expected HOST:PORT with a port in 0..65535")
    return host or "127.0.0.1", int(port)


def _run(args: argparse.Namespace) -> int:
    from edgefleet.server.fleet.ingest import IngestConfig
    from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig

    try:
        host, port = _host_port(args.broker, "--broker")
        http_host, http_port = _host_port(args.http, "--http")
        cfg = CoordinatorConfig(
            store=args.store,
            mqtt=IngestConfig(
                host=host,
                port=port,
                root=args.root,
                client_id=args.client_id,
                share_group=args.share_group,
                registration_open=not args.closed_registration,
                username=args.mqtt_username,
                password=_read_mqtt_password(args.mqtt_password_file),
                tls_ca=_broker_ca(args.broker_ca),
            ),
            http_host=http_host,
            http_port=http_port,
            token=_read_token(args.token_file),
            loss_grace_s=args.loss_grace,
            state_dir=args.state_dir,
            http_max_body_bytes=args.http_max_body,
            fleet_keys=args.fleet_key,
            bundles_dir=args.bundles_dir,
            upload_max_bytes=args.upload_max,
            signing_key=args.signing_key,
            fed_holdout=args.fed_holdout,
            catalogue_dir=args.catalogue_dir,
        )
    except (ValueError, OSError) as exc:
        print(f"edgefleet-server run: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    coordinator = Coordinator(cfg)
    try:
        coordinator.start()
    except Exception as exc:
        print(f"edgefleet-server run: error: {exc}", file=sys.stderr)
        return 1
    print(f"coordinator ready: {coordinator.url}", flush=True)
    stop.wait()
    coordinator.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Coordinator commands."""
    parser = CliParser(prog="edgefleet-server", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"edgefleet-server {__version__}",
        help="print the package version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("listen", help="decode and print every device message on a broker")
    p.add_argument("--host", default="127.0.0.1", help="MQTT broker host")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    p.add_argument("--root", default=DEFAULT_ROOT, help="topic root")
    p.set_defaults(func=_listen)
    p = sub.add_parser("run", help="ingest the fleet's traffic and serve the HTTP API")
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT of the MQTT broker")
    p.add_argument("--root", default=DEFAULT_ROOT, help="topic root")
    p.add_argument(
        "--store",
        default="sqlite:///var/lib/edgefleet/coordinator.db",
        help="sqlite:///PATH or a PostgreSQL URL/DSN (several coordinators need PostgreSQL)",
    )
    p.add_argument("--http", default="127.0.0.1:8080", help="HOST:PORT of the HTTP API")
    p.add_argument(
        "--token-file",
        help="file holding the API token for actions (default: the systemd credential "
        f"api-token, else ${TOKEN_ENV}; none: actions are refused)",
    )
    p.add_argument("--mqtt-username", default=None,
                   help="this coordinator's broker identity (edgefleet fleet provision "
                   "--coordinator); none: connect anonymously (test brokers only)")
    p.add_argument("--mqtt-password-file", default=None,
                   help="file holding its broker password (default: the systemd credential "
                   "mqtt-password, if present)")
    p.add_argument("--broker-ca", type=Path, default=None,
                   help="CA certificate of the broker's TLS listener: connect over TLS "
                   "(default: plain TCP, for the secure broker's loopback listener)")
    p.add_argument("--client-id", default=None,
                   help="MQTT client id: unique per coordinator, stable across restarts "
                   "(default: edgefleet-coordinator-<random>, made once and kept in "
                   "--state-dir; on the secure profile the broker uses the username)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the coordinator keeps its client id (default: the SQLite "
                   "store's directory, else $STATE_DIRECTORY, else /var/lib/edgefleet)")
    p.add_argument(
        "--share-group",
        default=None,
        help="coordinators in one share group split the device traffic (MQTT 5 shared "
        "subscriptions); without it this coordinator takes all of it (see docs/coordinator.md)",
    )
    p.add_argument("--closed-registration", action="store_true",
                   help="refuse devices that were not registered beforehand")
    p.add_argument("--loss-grace", type=float, default=300.0,
                   help="seconds a sequence gap may stay open before it counts as lost")
    p.add_argument("--http-max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest HTTP request body accepted; larger ones get 413")
    p.add_argument("--fleet-key", type=Path, action="append", default=[], metavar="PUB",
                   help="public key whose bundles may be rolled out (repeatable; the fleet's "
                   "fleet.pub); without one, uploads are refused")
    p.add_argument("--bundles-dir", type=Path, default=None,
                   help="where uploaded bundle archives are kept (default: STATE_DIR/bundles)")
    p.add_argument("--upload-max", type=int, default=1 << 30, metavar="BYTES",
                   help="largest bundle archive accepted by POST /bundles")
    p.add_argument("--signing-key", type=Path, default=None, metavar="KEYDIR/fleet.key",
                   help="the fleet's private key: federated rounds sign their new bundle and "
                   "roll it out (its public half must be a --fleet-key); without it a round "
                   "stops at 'aggregated' with an unsigned candidate (docs/coordinator.md), "
                   "and catalogue builds are refused")
    p.add_argument("--fed-holdout", type=Path, default=None, metavar="FILE.npz",
                   help="held-out labelled images (images, labels) that judge a federated "
                   "round's new heads; without it the devices' reported validation does")
    p.add_argument("--catalogue-dir", type=Path, default=None, metavar="DIR",
                   help="the model catalogue's source models, data and build logs (default: "
                   "STATE_DIR/catalogue); builds need --signing-key")
    p.set_defaults(func=_run)
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
