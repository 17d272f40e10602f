"""The test harness itself: broker lifecycle, persistence across restarts, PostgreSQL."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.server.local import broker as broker_module
from edgefleet.server.local.broker import MosquittoBroker, MosquittoNotFound
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.netutil import wait_listening


def _client(client_id: str, *, persistent: bool) -> mqtt.Client:
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )


def _connect(client: mqtt.Client, broker: MosquittoBroker, *, persistent: bool) -> None:
    props = Properties(PacketTypes.CONNECT)
    # A session expiry interval > 0 makes the broker keep the session while we are away.
    props.SessionExpiryInterval = 3600 if persistent else 0
    connected = threading.Event()

    def on_connect(c: mqtt.Client, u: object, flags: object, rc: object, p: object) -> None:
        connected.set()

    client.on_connect = on_connect
    client.connect(
        broker.host, broker.port, keepalive=5, clean_start=not persistent, properties=props
    )
    client.loop_start()
    assert connected.wait(10), "no CONNACK from the test broker"


def _subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe and wait for the broker's SUBACK: from then on the topic reaches us."""
    acked = threading.Event()
    client.on_subscribe = lambda *_a: acked.set()
    client.subscribe(topic, qos=1)
    assert acked.wait(10), f"no SUBACK for {topic}"


def test_broker_accepts_connections(mqtt_broker: MosquittoBroker) -> None:
    assert mqtt_broker.running
    assert wait_listening(mqtt_broker.host, mqtt_broker.port, timeout=1)


def test_publish_across_restart_with_persistent_session(
    mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/restart"
    received: queue.Queue[bytes] = queue.Queue()

    sub = _client(f"{topic_prefix}-sub".replace("/", "-"), persistent=True)
    sub.on_message = lambda c, u, m: received.put(m.payload)
    _connect(sub, mqtt_broker, persistent=True)
    _subscribe(sub, topic)
    sub.loop_stop()
    sub.disconnect()

    pub = _client(f"{topic_prefix}-pub".replace("/", "-"), persistent=False)
    _connect(pub, mqtt_broker, persistent=False)
    pub.publish(topic, b"before-restart", qos=1).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()

    # The queued message must survive the broker going away and coming back.
    mqtt_broker.restart()

    pub = _client(f"{topic_prefix}-pub2".replace("/", "-"), persistent=False)
    _connect(pub, mqtt_broker, persistent=False)
    pub.publish(topic, b"after-restart", qos=1).wait_for_publish(5)

    sub2 = _client(f"{topic_prefix}-sub".replace("/", "-"), persistent=True)
    sub2.on_message = lambda c, u, m: received.put(m.payload)
    _connect(sub2, mqtt_broker, persistent=True)  # resumes the session: no new subscribe
    got = [received.get(timeout=10), received.get(timeout=10)]
    assert got == [b"before-restart", b"after-restart"]
    for c in (pub, sub2):
        c.loop_stop()
        c.disconnect()


def test_client_reconnects_and_delivers_qos1_published_while_broker_down(
    mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/outage"
    received: queue.Queue[bytes] = queue.Queue()
    sub = _client(f"{topic_prefix}-s".replace("/", "-"), persistent=True)
    sub.on_message = lambda c, u, m: received.put(m.payload)
    sub.reconnect_delay_set(min_delay=1, max_delay=1)
    _connect(sub, mqtt_broker, persistent=True)
    _subscribe(sub, topic)
    pub = _client(f"{topic_prefix}-p".replace("/", "-"), persistent=True)
    pub.reconnect_delay_set(min_delay=1, max_delay=1)
    _connect(pub, mqtt_broker, persistent=True)

    mqtt_broker.stop()
    wait_until(lambda: not pub.is_connected(), 10, "the publisher to notice the broker is gone")
    # paho keeps a QoS 1 message published while disconnected and sends it on reconnect
    # (rc says "not connected", but the message is queued).
    pub.publish(topic, b"during-outage", qos=1)
    mqtt_broker.start()
    assert received.get(timeout=20) == b"during-outage"
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()


def test_missing_mosquitto_is_an_instruction(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(broker_module.shutil, "which", lambda *a, **k: None)
    with pytest.raises(MosquittoNotFound, match="apt-get install -y mosquitto"):
        MosquittoBroker(tmp_path)


def test_postgres_scratch_database(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (42)")
        row = conn.execute("SELECT x FROM t").fetchone()
    assert row == (42,)


def test_throwaway_postgres_cluster_when_no_local_server() -> None:
    """The fallback a user's machine without a running PostgreSQL gets."""
    from tests.harness.postgres import _throwaway_cluster, scratch_database

    with (
        _throwaway_cluster() as admin,
        scratch_database(admin) as dsn,
        psycopg.connect(dsn) as conn,
    ):
        row = conn.execute("SELECT 1").fetchone()
    assert row == (1,)
