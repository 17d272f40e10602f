"""Credentials for a local fleet on the secure broker profile, issued before the broker starts.

The demo's coordinator, real agents and simulated devices each get their own identity, the way
`edgefleet fleet provision` gives them out on a real fleet (docs/security.md).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.config import CREDENTIAL_FILES
from edgefleet.server.identity import IdentityDir
from edgefleet.server.identity.files import write_private
from edgefleet.server.identity.registry import Role


class LocalIdentities:
    """Provisions identities in one broker's identity directory; every call issues a password."""

    def __init__(self, ids: IdentityDir) -> None:
        self.ids = ids

    def _issue(self, name: str, role: Role = "device", group: str | None = None) -> str:
        # rotate: a rerun in the same directory gets fresh passwords, never an unknown old one
        issued = self.ids.provision(name, role=role, group=group, rotate=True)
        assert issued.password is not None  # rotate always issues one
        return issued.password

    def coordinator(self, name: str) -> str:
        """A coordinator identity; returns its password (its username is name)."""
        return self._issue(name, role="coordinator")

    def agent(self, device_id: str, credentials_dir: Path, group: str | None = None) -> Path:
        """A device identity whose password is written as systemd would hand it to the agent.

        Returns the directory to pass as CREDENTIALS_DIRECTORY.
        """
        password = self._issue(device_id, group=group)
        write_private(credentials_dir / CREDENTIAL_FILES["mqtt_password"], password + "\n")
        return credentials_dir

    def devices(self, device_ids: Iterable[str], group: str | None = None) -> dict[str, str]:
        """Device identities for simulated devices: device id -> password."""
        return {d: self._issue(d, group=group) for d in device_ids}


def anonymous_answer(host: str, port: int, timeout: float = 10.0) -> str:
    """What the broker answers an anonymous MQTT 5 CONNECT: its CONNACK reason, in words."""
    answered = threading.Event()
    reason: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        reason.append(str(rc))
        answered.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        return f"no connection: {exc}"
    client.loop_start()
    try:
        return reason[0] if answered.wait(timeout) else f"no CONNACK within {timeout:g} s"
    finally:
        client.disconnect()
        client.loop_stop()
