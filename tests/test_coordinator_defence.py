"""The coordinator's defence in depth (issue 12) through a real mosquitto, on both stores.

- Status ordering: boot and arrival decide, never the status's ts. A device process with a
  Last Will is SIGKILLed after someone published an online status of its boot with the largest
  ts the protocol admits; before the coordinator ordered statuses by arrival, that forged ts
  kept the device online after its Will.
- Reported drops: windows a device says its full outbox dropped are counted dropped, not lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.protocol import Telemetry, TopicTree, encode, offline_will
from edgefleet.agent.protocol.bounds import MAX_TS
from edgefleet.server.fleet.store import Store, open_store
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests import protocol_samples as samples
from tests.fleet_helpers import RawPublisher, start_ingestor

# A device process: connects with its Will set, publishes its birth retained, says so, waits.
_DEVICE = """
import sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, birth, will = sys.argv[1:6]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgefleet-pi-7", protocol=mqtt.MQTTv5)
c.will_set(topic, will.encode(), qos=1, retain=True)
c.connect(host, int(port), keepalive=60)
c.loop_start()
c.publish(topic, birth.encode(), qos=1, retain=True).wait_for_publish(10)
print("up", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        f"sqlite://{tmp_path}/fleet.db"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_dsn")
    )
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


def _online(store: Store) -> bool | None:
    d = store.device("pi-7")
    return None if d is None else d.online


def test_a_forged_future_ts_does_not_keep_a_sigkilled_agent_online(
    mqtt_broker: MosquittoBroker, topic_prefix: str, store: Store
) -> None:
    topic = TopicTree(topic_prefix).device("pi-7", "status")
    birth = samples.status("pi-7").model_copy(update={"ts": time.time()})
    ing = start_ingestor(mqtt_broker, topic_prefix, store)
    pub = RawPublisher(mqtt_broker)
    device = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _DEVICE,
            mqtt_broker.host,
            str(mqtt_broker.port),
            topic,
            encode(birth).decode(),
            encode(offline_will(birth)).decode(),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert device.stdout is not None and device.stdout.readline().strip() == "up"
        wait_until(lambda: _online(store) is True, 20, "the birth stored")
        forged = birth.model_copy(update={"ts": MAX_TS, "operating_point": 2})
        pub.publish(topic, encode(forged))
        wait_until(
            lambda: (
                (d := store.device("pi-7")) is not None
                and d.status is not None
                and d.status.operating_point == 2
            ),
            20,
            "the forged status stored (it is the newest status of the current boot)",
        )
        os.kill(device.pid, signal.SIGKILL)
        device.wait(10)
        wait_until(lambda: _online(store) is False, 20, "the Will to mark pi-7 offline")
        d = store.device("pi-7")
        assert d is not None and d.status is not None and d.status.ts == birth.ts
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(10)
        pub.close()
        ing.stop()


def _window(seq: int, overflow: int) -> Telemetry:
    now = time.time()
    return samples.telemetry("pi-7", seq=seq).model_copy(
        update={"window_start": now - 10, "window_end": now, "outbox_overflow": overflow}
    )


def test_windows_the_device_reported_dropping_are_dropped_not_lost(
    mqtt_broker: MosquittoBroker, topic_prefix: str, store: Store
) -> None:
    # The outbox dropped 3..7, its oldest, while the broker was away; the windows made after
    # the drops say so (a lifetime count). 9 vanished without a word.
    topic = TopicTree(topic_prefix).device("pi-7", "telemetry")
    ing = start_ingestor(mqtt_broker, topic_prefix, store)
    pub = RawPublisher(mqtt_broker)
    try:
        for seq in (0, 1, 2, 8, 10, 11):
            pub.publish(topic, encode(_window(seq, 5 if seq >= 10 else 0)))
        wait_until(lambda: store.telemetry_count() == 6, 20, "six windows stored")
        store.declare_losses(time.time() + 3600, grace_s=0)
        (rep,) = store.sequence_reports("pi-7")
        assert (rep.missing, rep.dropped, rep.lost, rep.reported_overflow) == (6, 5, 1, 5)
    finally:
        pub.close()
        ing.stop()
