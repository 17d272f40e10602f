"""The secure broker profile for the ingest benchmark: endpoints and identities.

The same drains run against two brokers: the anonymous one of the other figures and the
shipped configuration (TLS for devices, a password per client, the ACL; docs/security.md).
An Endpoint says how a benchmark client reaches either, so one drain function serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.identity import IdentityDir
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.identities import LocalIdentities


@dataclass(frozen=True)
class Endpoint:
    """How a benchmark client reaches a broker: its address and, if any, identity and CA."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ca: Path | None = None  # set: TLS, the broker verified against this CA

    @classmethod
    def anonymous(cls, broker: MosquittoBroker) -> Endpoint:
        """The plain listener of an anonymous broker."""
        return cls(broker.host, broker.port)

    def client_id(self, wanted: str) -> str:
        # use_username_as_clientid: on the secure broker the session is the username's.
        return self.username or wanted

    def secure(self, client: mqtt.Client) -> None:
        """Give a paho client this endpoint's credential and TLS, if it has them."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.ca is not None:
            client.tls_set(ca_certs=str(self.ca))

    def client(self, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
        """An MQTT 5 client for this endpoint (not yet connected)."""
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id(client_id),
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        self.secure(c)
        return c

    def ingest_config(self, root: str, client_id: str, share: str) -> IngestConfig:
        """The coordinator's configuration; TLS is not in it (IngestConfig has no TLS option)."""
        return IngestConfig(
            host=self.host,
            port=self.port,
            root=root,
            client_id=self.client_id(client_id),
            share_group=share,
            username=self.username,
            password=self.password,
        )


@dataclass(frozen=True)
class SecureFleet:
    """A started secure broker and the identities the benchmark connects with."""

    broker: MosquittoBroker
    loopback: Endpoint  # coordinator: password + ACL, no TLS (docs/security.md, same host)
    tls: Endpoint  # coordinator: password + ACL over TLS, as a remote coordinator would need
    # Queues the backlog: an identity of its own over TLS, allowed by the ACL to publish under
    # every device. Not each device's own connection: paho's select() loop stops at ~340
    # connections a process (1,024 descriptors), and devices publishing in turn would queue
    # the backlog grouped by device, a different (and faster to drain) order than the anonymous
    # broker's. The publish side is not timed; the drain sees the same queue either way.
    publisher: Endpoint


def start_secure(workdir: Path, root: str, max_queued: int) -> SecureFleet:
    """Provision the coordinators and the publisher under root, then start the broker."""
    creds = LocalIdentities(IdentityDir(workdir / "identity", root=root))
    broker = MosquittoBroker(workdir / "broker", max_queued_messages=max_queued, identity=creds.ids)
    assert broker.tls_port is not None  # the secure profile always has its TLS listener
    ca = creds.ids.ca

    def tls(name: str) -> Endpoint:
        return Endpoint(broker.host, broker.tls_port or 0, name, creds.coordinator(name), ca)

    loopback = Endpoint(
        broker.host, broker.port, "coord-loopback", creds.coordinator("coord-loopback")
    )
    fleet = SecureFleet(broker, loopback, tls("coord-tls"), tls("bench-publisher"))
    broker.start()
    return fleet
