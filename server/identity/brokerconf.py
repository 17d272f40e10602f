"""The fleet's mosquitto configuration: one renderer for the shipped file and the test broker.

`deploy/mosquitto/edgefleet.conf` is `render_conf(BrokerConf())` (a test keeps them equal), and
edgefleet.server.local.broker's secure profile renders the same text with its own ports and
directory, so what the tests exercise is what a deployment runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path("/etc/mosquitto/edgefleet")

# 1 MiB bundle chunks and 1 MiB replies (a snapshot) plus topic and properties; anything larger
# is no edgefleet message, and the broker disconnects its sender before buffering it.
MAX_PACKET_SIZE = 1024 * 1024 + 64 * 1024


@dataclass(frozen=True)
class BrokerConf:
    """Where the broker listens and where its identity files are."""

    directory: Path = DEFAULT_DIR
    tls_port: int = 8883
    tls_bind: str | None = None  # None: every interface
    local_port: int | None = 1883  # loopback only, for a coordinator on the broker's host
    max_queued_messages: int = 100_000
    persistence_dir: Path | None = None  # None: the distribution's (mosquitto.conf's) choice
    pid_file: Path | None = None  # None: the distribution's (Debian: /run/mosquitto/...)


def _listener(port: int, bind: str | None) -> str:
    return f"listener {port}" + (f" {bind}" if bind else "")


def render_conf(conf: BrokerConf) -> str:
    """The mosquitto.conf text (a conf.d drop-in) for conf."""
    d = conf.directory
    lines = [
        "# edgefleet broker: every client has its own identity (docs/security.md).",
        "# Written by edgefleet (server/identity/brokerconf.py); the identity files in",
        f"# {d} are managed by `edgefleet fleet provision` and `fleet revoke`.",
        "",
        "# Authentication and ACL apply to every listener alike.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d}/passwd",
        f"acl_file {d}/acl",
        "",
        "# Limits the fleet needs (docs/security.md#broker-limits).",
        f"max_packet_size {MAX_PACKET_SIZE}",
        f"max_queued_messages {conf.max_queued_messages}",
        "max_inflight_messages 0",
        "max_keepalive 3600",
        "persistent_client_expiration 14d",
        "",
        "# Devices: TLS only; the fleet CA (ca.pem on every device) signs the server certificate.",
        _listener(conf.tls_port, conf.tls_bind),
        "protocol mqtt",
        "tls_version tlsv1.2",
        f"cafile {d}/ca.pem",
        f"certfile {d}/broker.pem",
        f"keyfile {d}/broker.key",
        "require_certificate false",
        "# The username (the device id) becomes the client id: no client can take over",
        "# another's session or kick it off by reusing its client id.",
        "use_username_as_clientid true",
    ]
    if conf.local_port is not None:
        lines += [
            "",
            "# A coordinator on this host: loopback only, still a password and the ACL.",
            _listener(conf.local_port, "127.0.0.1"),
            "protocol mqtt",
            "use_username_as_clientid true",
        ]
    if conf.persistence_dir is not None:
        lines += [
            "",
            "persistence true",
            f"persistence_location {conf.persistence_dir}/",
            "persistence_file mosquitto.db",
        ]
    if conf.pid_file is not None:
        lines += ["", f"pid_file {conf.pid_file}"]
    return "\n".join(lines) + "\n"
