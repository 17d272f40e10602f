"""The shipped broker configuration on a real mosquitto, with real clients and a real agent.

Every refusal is asserted from the broker's own MQTT 5 answer (CONNACK, PUBACK reason codes) or,
for reads (mosquitto 2.0 grants a SUBACK and filters at delivery), from what arrives before a
later allowed message on the same path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree, decode_topic
from edgefleet.agent.protocol.messages import Telemetry
from edgefleet.server.cli import app as cli_app
from edgefleet.server.identity import IdentityDir
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests.agent_harness import reference_bundle
from tests.harness.mqttclient import Client

NOT_AUTHORIZED = 135
TREE = TopicTree()
OFFER = TREE.bundle_meta("ab" * 32)


@dataclass
class Fleet:
    """A secure broker and the passwords provisioning printed."""

    broker: MosquittoBroker
    ids: IdentityDir
    passwords: dict[str, str]

    def connect(self, name: str, *, password: str | None = None, client_id: str = "") -> Client:
        """A TLS connection as name (its provisioned password unless one is given)."""
        pw = password if password is not None else self.passwords[name]
        return Client(self.broker, name, pw, ca=self.ids.ca, client_id=client_id)

    def coordinator(self) -> Client:
        """The coordinator, on the loopback listener (no TLS), with its own credential."""
        return Client(self.broker, "coordinator", self.passwords["coordinator"])


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    ids = IdentityDir(tmp_path / "identity")
    passwords = {}
    for name, group in (("dev-a", "lab"), ("dev-b", "yard")):
        issued = ids.provision(name, group=group)
        assert issued.password
        passwords[name] = issued.password
    coord = ids.provision("coordinator", role="coordinator")
    assert coord.password
    passwords["coordinator"] = coord.password
    broker = MosquittoBroker(tmp_path / "mq", identity=ids)
    broker.start()
    try:
        yield Fleet(broker, ids, passwords)
    finally:
        broker.stop()


def test_anonymous_and_wrong_passwords_are_refused(fleet: Fleet) -> None:
    anon_tls = Client(fleet.broker, None, ca=fleet.ids.ca)
    anon_local = Client(fleet.broker, None)
    wrong = fleet.connect("dev-a", password=fleet.passwords["dev-b"])
    unknown = Client(fleet.broker, "dev-z", fleet.passwords["dev-a"], ca=fleet.ids.ca)
    for refused in (anon_tls, anon_local, wrong, unknown):
        assert refused.connack is not None and refused.connack.value == NOT_AUTHORIZED
    ok = fleet.connect("dev-a")
    assert ok.accepted, ok.connack


def test_a_device_publishes_only_under_its_own_topics(fleet: Fleet) -> None:
    dev = fleet.connect("dev-a")
    allowed = [TREE.device("dev-a", k) for k in ("status", "telemetry", "events", "reply")]
    allowed.append(TREE.fed_update("r1", "dev-a"))
    for topic in allowed:
        assert not dev.publish(topic).is_failure, topic
    forbidden = [
        TREE.device("dev-b", "telemetry"),  # speaking as another device
        TREE.device("dev-b", "status"),
        TREE.device("dev-a", "cmd"),  # commands are the coordinator's
        TREE.device("dev-b", "cmd"),
        TREE.group_cmd("lab"),
        OFFER,  # offers and chunks too
        TREE.bundle_chunk("ab" * 32, 0),
        TREE.fed_task("r1"),  # and rounds
        TREE.fed_update("r1", "dev-b"),
        "edgefleet/v2/anything",
    ]
    for topic in forbidden:
        assert dev.publish(topic).value == NOT_AUTHORIZED, topic
    assert dev.accepted


def test_a_device_reads_only_its_own_and_its_groups_commands(fleet: Fleet) -> None:
    dev = fleet.connect("dev-a")
    for f in ("edgefleet/v1/#", TREE.all_devices("cmd"), TREE.all_group_cmds()):
        dev.subscribe(f)
    coord = fleet.coordinator()
    hidden = [
        TREE.device("dev-b", "cmd"),
        TREE.group_cmd("yard"),
        TREE.device("dev-b", "telemetry"),
        TREE.fed_update("r1", "dev-b"),
    ]
    visible = [TREE.device("dev-a", "cmd"), TREE.group_cmd("lab"), TREE.fed_task("r1"), OFFER]
    for topic in hidden + visible:
        assert not coord.publish(topic).is_failure, topic
    # One publisher, one subscriber: the broker keeps the order, so once the last message is
    # in, anything hidden that had been delivered would be in too.
    wait_until(lambda: OFFER in dev.topics(), 15, "the offer at dev-a", detail=dev.topics)
    assert set(dev.topics()) == set(visible)


def test_no_client_takes_over_another_ones_client_id(fleet: Fleet) -> None:
    dev_a = fleet.connect("dev-a", client_id="edgefleet-dev-a")
    coord = fleet.coordinator()
    # The broker replaces every client id with the username, so these reach nobody's session.
    for stolen in ("edgefleet-dev-a", "dev-a", "coordinator"):
        intruder = fleet.connect("dev-b", client_id=stolen)
        assert intruder.accepted
        assert not intruder.publish(TREE.device("dev-b", "status")).is_failure
        intruder.close()
    assert dev_a.accepted and coord.accepted
    assert not coord.publish(TREE.device("dev-a", "cmd")).is_failure


def test_the_coordinator_commands_and_reads_every_device(fleet: Fleet) -> None:
    coord = fleet.coordinator()
    assert not coord.subscribe(
        TREE.shared("coordinators", TREE.all_devices("telemetry"))
    ).is_failure
    for name in ("dev-a", "dev-b"):
        fleet.connect(name).publish(TREE.device(name, "telemetry"), b"x")
    want = {TREE.device(n, "telemetry") for n in ("dev-a", "dev-b")}
    wait_until(lambda: want <= set(coord.topics()), 15, "both devices' telemetry")
    for topic in (TREE.device("dev-a", "cmd"), TREE.group_cmd("lab"), OFFER, TREE.fed_task("r")):
        assert not coord.publish(topic, retain=topic == OFFER).is_failure, topic


def test_revoke_disconnects_the_device_and_refuses_it_after_reload(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    dev_a, dev_b = fleet.connect("dev-a"), fleet.connect("dev-b")
    wait_until(fleet.broker.pid_file.exists, 15, "the broker's pid file")
    rc = cli_app.main(["fleet", "revoke", "dev-a", "--dir", str(fleet.ids.directory),
                       "--pid-file", str(fleet.broker.pid_file)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "reloaded" in capsys.readouterr().out
    wait_until(lambda: dev_a.disconnect is not None, 15, "dev-a dropped by the reload")
    again = fleet.connect("dev-a")
    assert again.connack is not None and again.connack.value == NOT_AUTHORIZED
    assert dev_b.accepted
    assert not dev_b.publish(TREE.device("dev-b", "telemetry")).is_failure


def test_an_agent_reports_over_tls_with_its_provisioned_credential(
    fleet: Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "creds" / "mqtt-password"
    rc = cli_app.main(["fleet", "provision", "cam-01", "--group", "lab", "--out", str(out),
                       "--dir", str(fleet.ids.directory), "--pid-file",
                       str(fleet.broker.pid_file)])  # fmt: skip
    assert rc == 0
    bundle, key = reference_bundle(tmp_path / "a")
    cfg = write_config(tmp_path / "a", device_id="cam-01", broker=fleet.broker, bundle=bundle,
                       key=key, username="cam-01", tls_ca=fleet.ids.ca)  # fmt: skip
    coord = fleet.coordinator()
    coord.subscribe(TREE.all_devices("telemetry"))
    # The password reaches the agent the way systemd's LoadCredential= hands it over.
    with AgentProcess(
        cfg, tmp_path / "a.log", env={"CREDENTIALS_DIRECTORY": str(out.parent)}
    ) as agent:
        wait_until(lambda: len(coord.messages) >= 2, 60, "2 telemetry windows", detail=agent.tail)
        agent.terminate()
    topic, payload = coord.messages[0]
    decoded = decode_topic(TREE, topic, payload)
    assert isinstance(decoded, Telemetry) and decoded.device_id == "cam-01"
    assert json.loads(payload)["seq"] >= 0
