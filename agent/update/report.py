"""The install events a device publishes: one vocabulary for the agent and the simulator.

The coordinator's rollout engine moves each device's rollout state from these events
(`install_state`, `manifest_sha256`, `rollout_id`; `have`/`total` while downloading), so
whatever emits them (the agent's UpdateManager, a simulated device) words them through this
one module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, Literal

from edgefleet.agent.protocol import InstallBundle

log = logging.getLogger(__name__)

InstallState = Literal[
    "downloading",
    "verifying",
    "health_checking",
    "active",
    "failed",
    "rolled_back",
    "refused",
]
# The event kind each state is reported under (EventKind of the protocol).
EVENT_KIND: Final[dict[str, str]] = {
    "downloading": "install_progress",
    "verifying": "install_progress",
    "health_checking": "install_progress",
    "active": "installed",
    "failed": "error",
    "refused": "error",
    "rolled_back": "rollback",
}

EventSink = Callable[[str, str, dict[str, Any]], None]


class InstallRefused(ValueError):
    """The command cannot be carried out as given; the message says why."""


class InstallReporter:
    """Words and sends a device's install events through `event(kind, message, details)`."""

    def __init__(self, device_id: str, event: EventSink) -> None:
        self.device_id = device_id
        self.event = event

    def step(
        self,
        state: InstallState,
        cmd: InstallBundle,
        message: str,
        archive_sha256: str | None,
        **details: Any,
    ) -> None:
        """A step of the install cmd asked for: '{model} v{version}: {state}: {message}'."""
        self.report(
            state,
            f"{cmd.model_id} v{cmd.version}: {state.replace('_', ' ')}: {message}",
            cmd.rollout_id,
            cmd.manifest_sha256,
            version=cmd.version,
            sha256=archive_sha256,
            **details,
        )

    def report(
        self,
        state: InstallState,
        message: str,
        rollout_id: str | None,
        manifest_sha256: str,
        **details: Any,
    ) -> None:
        """Any install event: its state, the bundle and rollout it is about, and details."""
        facts: dict[str, Any] = {
            "install_state": state,
            "manifest_sha256": manifest_sha256,
            "rollout_id": rollout_id,
            **details,
        }
        log.info("device %s: %s", self.device_id, message)
        self.event(EVENT_KIND[state], message, facts)

    def refuse(self, cmd: InstallBundle, why: str, reason: str) -> InstallRefused:
        """Report the refusal of cmd (reason: a short code such as 'busy') and return the
        exception to raise."""
        self.report(
            "refused",
            f"install of {cmd.model_id} v{cmd.version} refused: {why}",
            cmd.rollout_id,
            cmd.manifest_sha256,
            version=cmd.version,
            reason=reason,
        )
        return InstallRefused(why)
