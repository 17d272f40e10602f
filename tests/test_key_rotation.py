"""Fleet key rotation and revocation end to end: CLI, coordinator API, retained keys/trust, agent.

One real agent process trusts only key A (its config). The operator rotates to B with
`edgefleet keys rotate` (a statement signed by A, published retained through POST /keys/trust);
the agent accepts it by itself, a bundle signed by B installs through a rollout, and after the
overlap a bundle signed by A is refused. A statement signed by a key the agent never trusted,
put on the broker by whoever controls it, is refused and changes nothing. Then B -> C and B is
revoked with C during the overlap: the agent trusts C only at once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.agent.bundle import pack, verify_bundle
from edgefleet.agent.bundle.keys import generate_private_key, key_id, load_public_key
from edgefleet.agent.bundle.trust import TrustStore, sign_trust
from edgefleet.agent.protocol import KeyTrust, TopicTree, encode
from edgefleet.server.cli.app import main as cli
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.identity import IdentityDir
from edgefleet.server.keystore import init_key, load_key
from edgefleet.server.keytrust import (
    KeyRotationError,
    archived_public,
    load_archived,
    load_chain,
    parse_overlap,
    revoke,
    rotate,
)
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.rollout.views import RolloutView
from tests.harness.mqttclient import Client
from tests.rollout.fleet import (
    TOKEN,
    LocalFleet,
    local_fleet,
    reference_version,
    restart_agent,
    start_coordinator_with,
    state_dir,
)

OVERLAP = "3s"
NOT_AUTHORIZED = 135


def events(client: FleetClient, kind: str) -> list[dict[str, object]]:
    detail = client.device("cam-0", windows=0, events=50)
    return [
        {"message": e.event.message, **e.event.details}
        for e in detail.events
        if e.event.kind == kind
    ]


def agent_trust(fleet: LocalFleet) -> list[str]:
    """What the agent persisted, read as the agent reads it at start."""
    config_key = fleet.root / "keys" / "fleet.pub"
    return TrustStore(
        [load_public_key(config_key)], state_dir(fleet, "cam-0") / "keys" / "trust.json"
    ).trusted_ids()


def deploy(fleet: LocalFleet, client: FleetClient, bundle: Path, tmp: Path) -> RolloutView:
    archive = pack(bundle, tmp / f"{bundle.parent.name}-{bundle.name}.tar.gz")
    sha = client.upload_bundle(archive.read_bytes()).sha256
    view = client.create_rollout(
        {"bundle_sha256": sha, "group": "lab", "canary": "1", "soak_s": 1, "waves": "100%"}
    )
    box: dict[str, RolloutView] = {}

    def done() -> bool:
        box["v"] = client.rollout(view.rollout_id)
        return box["v"].phase == "done"

    wait_until(done, 120, "rollout to finish", detail=lambda: f"{box.get('v')}\n{fleet.logs()}")
    return box["v"]


def running(client: FleetClient) -> str | None:
    return next(d.bundle_sha256 for d in client.devices() if d.device_id == "cam-0")


def test_rotate_install_expire_refuse_and_revoke(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        a = fleet.key
        v1 = reference_version(tmp_path, a, 1)
        client = fleet.start_coordinator()
        fleet.start_agent("cam-0", v1)
        fleet.wait_online(client, 1)
        # The operator's key directory: a copy, so the agent's config keeps pointing at A.
        ops = tmp_path / "ops-keys"
        shutil.copytree(tmp_path / "keys", ops)
        conn = ["--url", client.url, "--token", TOKEN]

        # -- rotate A -> B: the agent accepts the statement by itself --------------------
        assert cli(["keys", "rotate", "--overlap", OVERLAP, "--dir", str(ops), *conn]) == 0
        b = load_key(ops)
        assert b.id != a.id
        chain = load_chain(ops)
        expires = chain.statements[-1].old_key_expires_at
        assert expires is not None and chain.statements[-1].signer == a.id

        def accepted() -> bool:
            return any(e["key_id"] == b.id for e in events(client, "keys_changed"))

        wait_until(accepted, 30, "keys_changed event for B", detail=fleet.logs)
        assert b.id in agent_trust(fleet)

        # -- a statement by a key the agent never trusted, put on the broker directly -----
        x, y = generate_private_key(), generate_private_key()
        forged = sign_trust(
            x,
            y.public_key(),
            not_before=time.time(),
            old_key_expires_at=None,
            issued_ts=time.time(),
        )
        before = (state_dir(fleet, "cam-0") / "keys" / "trust.json").read_bytes()
        rogue = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        rogue.connect(mqtt_broker.host, mqtt_broker.port)
        rogue.loop_start()
        try:
            doc = KeyTrust(statements=[forged], published_ts=time.time())
            topic = TopicTree(topic_prefix).keys_trust()
            rogue.publish(topic, encode(doc), qos=1, retain=True).wait_for_publish(5)

            def refused() -> list[dict[str, object]]:
                return [
                    e
                    for e in events(client, "keys_refused")
                    if e["signer"] == key_id(x.public_key())
                ]

            wait_until(lambda: bool(refused()), 30, "keys_refused event", detail=fleet.logs)
            assert "the signer is not a key this device knows" in str(refused()[0]["message"])
        finally:
            rogue.loop_stop()
            rogue.disconnect()
        assert (state_dir(fleet, "cam-0") / "keys" / "trust.json").read_bytes() == before
        assert key_id(y.public_key()) not in agent_trust(fleet)
        # The coordinator's document goes back on the broker (what a real operator would do).
        assert cli(["keys", "publish", "--dir", str(ops), *conn]) == 0

        # -- the coordinator takes uploads signed by B (and A, for the overlap) -----------
        assert fleet.coordinator is not None
        fleet.coordinator.stop()
        client = start_coordinator_with(
            fleet, fleet_keys=[ops / "fleet.pub", archived_public(ops, a.id)]
        )
        conn = ["--url", client.url, "--token", TOKEN]
        (tmp_path / "by-b").mkdir()
        v2 = reference_version(tmp_path / "by-b", b, 2)
        done = deploy(fleet, client, v2, tmp_path)
        assert done.state == "completed", done
        want = verify_bundle(v2, [b.public]).manifest_sha256
        wait_until(lambda: running(client) == want, 20, "cam-0 on v2 (signed by B)")

        # -- after the overlap, a bundle signed by A is refused on the device -------------
        wait_until(lambda: time.time() > expires, 30, "the overlap to end")
        assert agent_trust(fleet) == [b.id]
        # Restarted, the agent (its config still names only A) runs the B-signed bundle: it
        # reads its accepted statements before it loads anything.
        fleet.agents["cam-0"].terminate(10)
        restart_agent(fleet, "cam-0")
        wait_until(
            lambda: any(d.online and d.bundle_sha256 == want for d in client.devices()),
            60,
            "cam-0 back on v2 after a restart",
            detail=fleet.logs,
        )
        (tmp_path / "by-a").mkdir()
        v3 = reference_version(tmp_path / "by-a", load_archived(ops, a.id), 3)
        done = deploy(fleet, client, v3, tmp_path)
        assert done.state == "halted", done
        assert running(client) == want  # still v2
        # The device's own words, relayed by the halted rollout.
        assert f"signed by key {a.id}, which is not trusted here (trusted: {b.id})" in str(
            done.reason
        ), done

        # -- rotate B -> C, then revoke B with C: the agent trusts C only ------------------
        assert cli(["keys", "rotate", "--overlap", "1h", "--dir", str(ops), *conn]) == 0
        c = load_key(ops)
        assert cli(["keys", "revoke", b.id, "--dir", str(ops), *conn]) == 0

        def revoked() -> bool:
            return any(
                e["action"] == "revoke" and e["key_id"] == b.id
                for e in events(client, "keys_changed")
            )

        wait_until(revoked, 30, "keys_changed event revoking B", detail=fleet.logs)
        assert agent_trust(fleet) == [c.id]
        persisted = json.loads((state_dir(fleet, "cam-0") / "keys" / "trust.json").read_bytes())
        assert [s["action"] for s in persisted["statements"]] == ["trust", "trust", "revoke"]
        # The current key never revokes itself: the CLI refuses, and says to rotate first.
        assert cli(["keys", "revoke", c.id, "--dir", str(ops), "--no-publish"]) != 0
        assert load_chain(ops).statements[-1].action == "revoke"  # nothing was added


# -- the key directory side, without a fleet ---------------------------------------------------


def test_rotate_keeps_the_old_key_and_signs_with_it(tmp_path: Path) -> None:
    a, _ = init_key(tmp_path)
    done = rotate(tmp_path, parse_overlap("7d"), now=1_800_000_000.0)
    b = load_key(tmp_path)
    assert (done.old_id, done.new_id) == (a.id, b.id)
    assert done.old_key_expires_at == 1_800_000_000.0 + 7 * 86400
    assert load_archived(tmp_path, a.id).id == a.id  # kept: it may still sign revocations
    assert key_id(load_public_key(archived_public(tmp_path, a.id))) == a.id
    assert key_id(load_public_key(tmp_path / "fleet.pub")) == b.id
    store = TrustStore([a.public], None)
    out = store.apply(load_chain(tmp_path), now=1_800_000_000.0)
    assert out.refused == [] and store.trusted_ids(1_800_000_001.0) == sorted([a.id, b.id])
    assert store.trusted_ids(1_800_000_000.0 + 7 * 86400) == [b.id]
    # Expired, A still verifies what was installed under it; revoked, it would not.
    assert a.id in {key_id(k) for k in store.unrevoked_keys()}


def test_revoke_refusals_name_the_rule(tmp_path: Path) -> None:
    a, _ = init_key(tmp_path)
    with pytest.raises(
        KeyRotationError, match="is the current signing key: run `edgefleet keys rotate` first"
    ):
        revoke(tmp_path, a.id)
    with pytest.raises(KeyRotationError, match="expected 16 lowercase hex digits"):
        revoke(tmp_path, "nope")
    rotate(tmp_path, 3600.0)
    chain = revoke(tmp_path, a.id)  # the old key, stolen: the new one revokes it
    assert [s.action for s in chain.statements] == ["trust", "revoke"]
    with pytest.raises(KeyRotationError, match="the key is already revoked"):
        revoke(tmp_path, a.id)


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604800.0), ("36h", 129600.0), ("1d12h", 129600.0), ("3s", 3.0)]
)
def test_parse_overlap(text: str, seconds: float) -> None:
    assert parse_overlap(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "0s", "7 days", "-1d"])
def test_parse_overlap_refuses(text: str) -> None:
    with pytest.raises(KeyRotationError, match="overlap"):
        parse_overlap(text)


def test_on_the_secure_broker_devices_read_keys_trust_and_only_the_coordinator_writes_it(
    tmp_path: Path,
) -> None:
    ids = IdentityDir(tmp_path / "identity")
    dev_pw = ids.provision("dev-a", group="lab").password
    coord_pw = ids.provision("coordinator", role="coordinator").password
    assert dev_pw and coord_pw
    broker = MosquittoBroker(tmp_path / "mq", identity=ids)
    broker.start()
    try:
        topic = TopicTree().keys_trust()
        dev = Client(broker, "dev-a", dev_pw, ca=ids.ca)
        assert dev.publish(topic, retain=True).value == NOT_AUTHORIZED
        coord = Client(broker, "coordinator", coord_pw)
        assert not coord.publish(topic, retain=True).is_failure
        assert not dev.subscribe(topic).is_failure  # the retained document arrives
        wait_until(lambda: topic in dev.topics(), 15, "keys/trust at dev-a", detail=dev.topics)
    finally:
        broker.stop()
