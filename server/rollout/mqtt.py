"""The rollout engine's two ways out to the broker: commands and retained archives.

Both go over the coordinator's own ingest connection (one identity, one socket). A command is
published and logged without waiting for the reply: the engine follows devices through their
events and statuses in the store, which survive a coordinator restart, while a reply would not.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from edgefleet.agent.protocol import Command, encode
from edgefleet.agent.protocol.commands import AnyCommand
from edgefleet.server.fleet.ingest import Ingestor
from edgefleet.server.fleet.store.base import CommandRecord
from edgefleet.server.rollout.archives import ArchiveInfo
from edgefleet.server.rollout.publisher import choose_chunk_size, clear, make_offer, publish

log = logging.getLogger(__name__)


class MqttSender:
    """Fire-and-forget commands to one device (QoS 1, logged in the store)."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def command(self, device_id: str, body: AnyCommand, expires_s: float) -> str:
        now = time.time()
        cmd = Command(id=uuid.uuid4().hex, ts=now, expires_at=now + expires_s, command=body)
        payload = encode(cmd)
        self.ingestor.store.log_command(
            CommandRecord(
                command_id=cmd.id,
                target=f"dev/{device_id}",
                name=body.name,
                body_json=payload.decode(),
                sent_at=now,
                replies=(),
            )
        )
        topic = self.ingestor.tree.device(device_id, "cmd")
        self.ingestor.client.publish(topic, payload, qos=1)
        log.info("command %s %s -> dev/%s", cmd.id, body.name, device_id)
        return cmd.id


class MqttPublisher:
    """Puts an archive on the broker once (retained chunks, then the offer) and clears it."""

    def __init__(self, ingestor: Ingestor, timeout_s: float = 600.0) -> None:
        self.ingestor = ingestor
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._seen: dict[str, threading.Event] = {}
        ingestor.on_bundle = self._on_bundle

    def generation(self) -> int:
        """Changes with every new broker session: retained messages may be gone since."""
        return self.ingestor.connects

    def present(self, info: ArchiveInfo, timeout_s: float = 3.0) -> bool:
        """Whether the broker still holds the archive's offer (and so its chunks).

        The offer is published after its chunks and cleared before them, so an offer on the
        broker implies every chunk is there too, also after a broker restart from its
        persistence file. Subscribing makes the broker send the retained offer, if any.
        """
        topic = self.ingestor.tree.bundle_meta(info.sha256)
        seen = threading.Event()
        with self._lock:
            self._seen[topic] = seen
        try:
            self.ingestor.client.subscribe(topic, qos=1)
            return seen.wait(timeout_s)
        finally:
            self.ingestor.client.unsubscribe(topic)
            with self._lock:
                self._seen.pop(topic, None)

    def _on_bundle(self, topic: str, payload: bytes) -> None:
        with self._lock:
            seen = self._seen.get(topic)
        if seen is not None and payload:  # an empty retained payload is a cleared offer
            seen.set()

    def _offer(self, info: ArchiveInfo):  # type: ignore[no-untyped-def]
        return make_offer(
            info.path,
            model_id=info.model_id,
            version=info.version,
            manifest_sha256=info.manifest_sha256,
            kind=info.kind,
            base_manifest_sha256=info.base_manifest_sha256,
            chunk_size=choose_chunk_size(info.size),
        )

    def publish(self, info: ArchiveInfo) -> int:
        report = publish(
            self.ingestor.client, self.ingestor.tree, info.path, self._offer(info), self.timeout_s
        )
        return report.bytes_published

    def clear(self, info: ArchiveInfo) -> None:
        clear(self.ingestor.client, self.ingestor.tree, self._offer(info))
        log.info("bundle %s cleared from the broker", info.sha256[:12])
