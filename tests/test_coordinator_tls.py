"""`edgefleet-server run` on the shipped secure broker: its own identity, over TLS, as deployed.

The coordinator process gets its provisioned password as a systemd credential and the fleet CA;
a provisioned device publishes over TLS; the operator sees the device through the API.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree, encode
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.identity import IdentityDir
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.netutil import free_port
from tests.harness.mqttclient import Client
from tests.protocol_samples import status, telemetry

TREE = TopicTree()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, IdentityDir, dict[str, str]]]:
    ids = IdentityDir(tmp_path / "identity")
    passwords = {}
    for name, role in (("pi-7", "device"), ("coordinator", "coordinator")):
        issued = ids.provision(name, role=role)
        assert issued.password
        passwords[name] = issued.password
    broker = MosquittoBroker(tmp_path / "mq", identity=ids)
    broker.start()
    try:
        yield broker, ids, passwords
    finally:
        broker.stop()


def _coordinator(
    tmp_path: Path, broker: MosquittoBroker, *extra: str, credentials: Path | None = None
) -> tuple[subprocess.Popen[bytes], FleetClient, Path]:
    port = free_port()
    log = tmp_path / f"coordinator-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.server", "run",
         "--store", f"sqlite:///{tmp_path / f'fleet-{port}.db'}",
         "--http", f"127.0.0.1:{port}", *extra],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )
    return proc, FleetClient(f"http://127.0.0.1:{port}"), log


def test_the_coordinator_runs_on_the_secure_broker_over_tls_with_its_own_identity(
    tmp_path: Path, secure: tuple[MosquittoBroker, IdentityDir, dict[str, str]]
) -> None:
    broker, ids, passwords = secure
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text(passwords["coordinator"] + "\n")
    proc, api, log = _coordinator(
        tmp_path, broker,
        "--broker", f"{broker.host}:{broker.tls_port}", "--broker-ca", str(ids.ca),
        "--mqtt-username", "coordinator",
        credentials=creds,
    )
    device = None
    try:
        def ready() -> bool:
            try:
                return api.devices() is not None and "connected" in log.read_text()
            except ApiError:
                return False

        wait_until(ready, 60, "the coordinator's API and broker session", detail=log.read_text)
        device = Client(broker, "pi-7", passwords["pi-7"], ca=ids.ca)
        assert device.accepted
        assert device.publish(TREE.device("pi-7", "status"), encode(status("pi-7")), True) == 0
        assert device.publish(TREE.device("pi-7", "telemetry"), encode(telemetry("pi-7", 0))) == 0
        wait_until(
            lambda: [(d.device_id, d.online) for d in api.devices()] == [("pi-7", True)],
            30,
            "the device in the coordinator's registry",
            detail=log.read_text,
        )
    finally:
        if device is not None:
            device.close()
        proc.terminate()
        proc.wait(20)


def test_bad_coordinator_credentials_options_are_named(
    tmp_path: Path, secure: tuple[MosquittoBroker, IdentityDir, dict[str, str]]
) -> None:
    broker, _ids, _ = secure
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for extra, named in (
        (("--mqtt-password-file", str(empty)), "--mqtt-password-file"),
        (("--mqtt-password-file", str(tmp_path / "none")), "--mqtt-password-file"),
        (("--broker-ca", str(tmp_path / "none.pem")), "--broker-ca"),
    ):
        proc, _api, log = _coordinator(
            tmp_path, broker, "--broker", f"{broker.host}:{broker.port}", *extra
        )
        assert proc.wait(60) == 2
        assert named in log.read_text() and "Traceback" not in log.read_text()
