"""The round engine's way out to the broker: a round's task, retained, and its clearing.

Over the coordinator's own ingest connection (one identity, one socket). The task is retained
so that a device connecting mid-round still gets it; an empty retained message clears it when
the round closes, so one connecting later does not train for a round that is over. Both wait
for the broker's acknowledgement, so the engine moves on only once the broker has it.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt

from edgefleet.agent.protocol import FedTask, encode
from edgefleet.server.fleet.ingest import Ingestor

log = logging.getLogger(__name__)


class TaskPublishError(RuntimeError):
    """The broker did not take the task (or its clearing); the engine retries next tick."""


class MqttTaskPublisher:
    """Retained tasks on fed/{round}/task through the ingestor's client."""

    def __init__(self, ingestor: Ingestor, timeout_s: float = 10.0) -> None:
        self.ingestor = ingestor
        self.timeout_s = timeout_s

    def generation(self) -> int:
        """Changes with every new broker session: retained messages may be gone since."""
        return self.ingestor.connects

    def publish_task(self, task: FedTask) -> None:
        self._publish(self.ingestor.tree.fed_task(task.round_id), encode(task))

    def clear_task(self, round_id: str) -> None:
        self._publish(self.ingestor.tree.fed_task(round_id), b"")
        log.info("round %s: task cleared from the broker", round_id)

    def _publish(self, topic: str, payload: bytes) -> None:
        info = self.ingestor.client.publish(topic, payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TaskPublishError(f"{topic}: not sent ({mqtt.error_string(info.rc)})")
        info.wait_for_publish(self.timeout_s)
        if not info.is_published():
            raise TaskPublishError(f"{topic}: the broker did not acknowledge it in time")
