"""Fixtures of the simulator tests: an observer on the broker, simulators that always stop."""

from __future__ import annotations

from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.server.fleet.simulate import Simulator
from edgefleet.server.local.broker import MosquittoBroker
from tests.simulate.helpers import Collector


@pytest.fixture
def collector(mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Collector]:
    c = Collector(mqtt_broker, topic_prefix)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def sims() -> Iterator[list[Simulator]]:
    """Simulators a test started; stopped (hard) afterwards whatever happened."""
    started: list[Simulator] = []
    yield started
    for sim in started:
        sim.stop(graceful=False)


@pytest.fixture
def publisher(mqtt_broker: MosquittoBroker) -> Iterator[mqtt.Client]:
    """A plain client that publishes commands, as the coordinator would."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    yield pub
    pub.disconnect()
    pub.loop_stop()


