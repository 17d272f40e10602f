"""Send a command to a device or a group and collect the replies."""

from __future__ import annotations

import logging
import time
import uuid

from edgefleet.agent.protocol import Command, encode
from edgefleet.agent.protocol.commands import AnyCommand
from edgefleet.server.fleet.ingest import Ingestor
from edgefleet.server.fleet.store.base import CommandRecord
from edgefleet.server.fleet.views import CommandOutcome

log = logging.getLogger(__name__)


class UnknownTarget(LookupError):
    """The device or group is not in the registry."""


class Commander:
    """Publishes on the ingestor's connection; replies come back through its subscription.

    Every coordinator subscribes to replies without $share (see ingest.py), so the one that
    sent a command sees each reply itself and need not look for it in the store.
    """

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor
        self.store = ingestor.store
        self.tree = ingestor.tree

    def send(
        self,
        command: AnyCommand,
        *,
        device: str | None = None,
        group: str | None = None,
        timeout_s: float = 5.0,
        expires_s: float | None = 60.0,
    ) -> CommandOutcome:
        """Publish the command, log it, and wait up to timeout_s for every target's reply."""
        if (device is None) == (group is None):
            raise ValueError("give exactly one of device or group")
        if device is not None:
            if self.store.device(device) is None:
                raise UnknownTarget(f"unknown device {device!r}")
            topic, target, expected = self.tree.device(device, "cmd"), f"dev/{device}", {device}
        else:
            assert group is not None
            members = self.store.devices(group)
            if not members:
                raise UnknownTarget(f"group {group!r} has no devices")
            topic, target = self.tree.group_cmd(group), f"group/{group}"
            # Offline members get nothing now (commands are not retained); don't wait for them.
            expected = {d.device_id for d in members if d.online}
        now = time.time()
        cmd = Command(
            id=uuid.uuid4().hex,
            ts=now,
            expires_at=None if expires_s is None else now + expires_s,
            command=command,
        )
        body = encode(cmd)
        self.store.log_command(
            CommandRecord(
                command_id=cmd.id,
                target=target,
                name=command.name,
                body_json=body.decode(),
                sent_at=now,
                replies=(),
            )
        )
        listener = self.ingestor.listen_replies()
        try:
            self.ingestor.client.publish(topic, body, qos=1)
            log.info("command %s %s -> %s", cmd.id, command.name, target)
            got = listener.wait(cmd.id, expected, timeout_s)
        finally:
            listener.close()
        return CommandOutcome(
            command_id=cmd.id,
            target=target,
            replies=[got[d] for d in sorted(got)],
            missing=sorted(expected - got.keys()),
        )
