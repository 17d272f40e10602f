"""The secure broker profile for the ingest benchmark: endpoints, identities, device preload.

The same drains run against two brokers: the anonymous one of the other figures and the
shipped configuration (TLS for devices, a password per client, the ACL; docs/security.md).
An Endpoint says how a benchmark client reaches either, so one drain function serves both.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.identity import IdentityDir
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.identities import LocalIdentities

# Devices connect one after another on this many threads: enough to overlap TLS handshakes
# with publishing, few enough for two cores. The preload is not timed.
PRELOAD_THREADS = 8


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
    """A started secure broker, the coordinator endpoints on it and every device's password."""

    broker: MosquittoBroker
    loopback: Endpoint  # coordinator: password + ACL, no TLS (docs/security.md, same host)
    tls: Endpoint  # coordinator: password + ACL over TLS, as a remote coordinator would need
    devices: dict[str, str]
    ca: Path

    def preload(self, payloads: list[tuple[str, bytes]]) -> None:
        """Each device publishes its own messages, with its own password, over TLS."""
        per_device: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        for topic, data in payloads:
            per_device[topic.split("/")[-2]].append((topic, data))
        with ThreadPoolExecutor(PRELOAD_THREADS) as pool:
            list(pool.map(self._publish_as, per_device.items()))

    def _publish_as(self, item: tuple[str, list[tuple[str, bytes]]]) -> None:
        device, messages = item
        port = self.broker.tls_port
        assert port is not None  # the secure profile always has its TLS listener
        ep = Endpoint(self.broker.host, port, device, self.devices[device], self.ca)
        c = ep.client(device)
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.connect(ep.host, ep.port)
        c.loop_start()
        infos = [c.publish(topic, data, qos=1) for topic, data in messages]
        for info in infos:
            info.wait_for_publish(120)
            # Under MQTT 5 a publish the ACL refuses is still PUBACKed (reason 135): only
            # the stored count after the drain proves every message got through.
        c.disconnect()
        c.loop_stop()


def start_secure(workdir: Path, root: str, device_ids: list[str], max_queued: int) -> SecureFleet:
    """Provision the devices and two coordinators under root, then start the broker."""
    creds = LocalIdentities(IdentityDir(workdir / "identity", root=root))
    broker = MosquittoBroker(workdir / "broker", max_queued_messages=max_queued, identity=creds.ids)
    devices = creds.devices(device_ids)
    host = broker.host
    loopback = Endpoint(host, broker.port, "coord-loopback", creds.coordinator("coord-loopback"))
    assert broker.tls_port is not None
    tls = Endpoint(host, broker.tls_port, "coord-tls", creds.coordinator("coord-tls"), creds.ids.ca)
    broker.start()
    return SecureFleet(broker, loopback, tls, devices, creds.ids.ca)
