"""One simulated agent: identity, payloads, backlog, the commands it obeys, its governor.

Touched only by the simulator's loop thread (or under its lock); its MQTT connection is
managed by `sessions.Sessions`, which reads and sets the connection fields below.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from pydantic import JsonValue

from edgefleet.agent import __version__ as AGENT_VERSION
from edgefleet.agent.commands import CommandHandler
from edgefleet.agent.protocol import (
    UNCORRELATED_ID,
    Event,
    EventKind,
    Hardware,
    InstallBundle,
    RollbackBundle,
    Status,
    Telemetry,
    TopicTree,
    encode,
)

from .backlog import EVENTS, REPLY, TELEMETRY, Backlog, EntryKind
from .config import SimConfig, device_id
from .installs import Installs
from .stats import DeviceStats
from .timers import Timers
from .variants import SimVariant
from .workload import (
    BOARDS,
    EXITS,
    POINTS,
    SIM_MODEL_ID,
    default_point,
    governor_move,
    simulate_variant_window,
    simulate_window,
)

log = logging.getLogger(__name__)

DeviceState = Literal["waiting", "connecting", "online", "held", "stopped"]


class SimDevice:
    """State of one simulated agent."""

    def __init__(
        self,
        cfg: SimConfig,
        tree: TopicTree,
        index: int,
        position: int,
        on_send: Callable[[SimDevice], None],
        timers: Timers | None = None,
        on_birth: Callable[[SimDevice], None] | None = None,
    ) -> None:
        """`on_send` is called when a new backlog entry is ready to hand to the connection.

        With variants configured, `timers` runs the stages of installs and `on_birth` publishes
        the new birth once another variant runs.
        """
        self.cfg = cfg
        self.index = index
        self.position = position  # 0..devices-1 inside this simulator
        self.device_id = device_id(cfg.prefix, index)
        self.topics: dict[str, str] = {
            kind: tree.device(self.device_id, kind)
            for kind in ("status", "telemetry", "events", "reply", "cmd")
        }
        self.group_topic = tree.group_cmd(cfg.group) if cfg.group else None
        machine, cpus, ram, board, accel, device_class = BOARDS[index % len(BOARDS)]
        self.device_class = device_class
        self.hardware = Hardware(
            machine=machine,
            system="Linux",
            cpu_count=cpus,
            ram_mb=ram,
            accelerators=list(accel),
            device_model=board,
            device_class=device_class,
        )
        self.boot_id = str(uuid.uuid4())  # one per simulated agent start
        self.cpu_count = cpus
        self._on_send = on_send
        # The connection, managed by Sessions.
        self.client: mqtt.Client | None = None
        self.session_birth: Status | None = None  # birth of the current connection
        self.state: DeviceState = "waiting"
        self.connect_started = 0.0
        self.retry_delay = 0.0
        self.connects = 0
        self.disconnected_at: float | None = None
        self.stop_mid: int | None = None
        self.backlog = Backlog(cfg.backlog_limit)
        self.next_seq = 0
        self.event_seq = 0
        self.commands = 0
        self.commands_rejected = 0
        # The simulated workload.
        self.period = 1.0 / cfg.rate
        self.window_end = 0.0  # wall time the next window starts at
        self.slowdown = 1.0  # latency multiplier (Simulator.set_slowdown)
        self.installs: Installs | None = None
        self._on_birth = on_birth
        if cfg.variants:
            if timers is None:
                raise ValueError("a simulated device with variants needs the loop's timers")
            self.installs = Installs(
                self.device_id,
                cfg,
                timers,
                device_class,
                self.enqueue_event,
                self._switched,
            )
            self.default_point = self.installs.running.default_point
        else:
            self.default_point = default_point(index)
        self.speed = cfg.speeds()[device_class]
        self.operating_point = self.default_point
        self.pinned = False
        self.commanded = False  # a command moved the operating point; the governor waits once
        self.thresholds: list[float | None] = [0.8, 0.9]
        self.handler = CommandHandler(self.device_id, self)

    def stats(self) -> DeviceStats:
        """This device's counters now."""
        return DeviceStats(
            device_id=self.device_id,
            next_seq=self.next_seq,
            acked=self.backlog.acked,
            backlog=len(self.backlog),
            overflow=self.backlog.overflow,
            online=self.state == "online",
            connects=self.connects,
            events=self.event_seq,
            commands=self.commands,
            commands_rejected=self.commands_rejected,
        )

    # -- payloads ----------------------------------------------------------------------

    @property
    def variant(self) -> SimVariant | None:
        """The variant running now; None without variants (the fixed workload.POINTS)."""
        return self.installs.running if self.installs is not None else None

    def model(self) -> tuple[str, int]:
        """Model id and version running now."""
        v = self.variant
        return (v.model_id, v.version) if v is not None else (SIM_MODEL_ID, 1)

    def points(self) -> int:
        """How many operating points the running model has."""
        v = self.variant
        return v.points if v is not None else len(POINTS)

    def birth(self, online: bool = True) -> Status:
        """The status this device publishes now (retained birth, or offline when stopping)."""
        model_id, version = self.model()
        installs = self.installs
        previous = installs.previous if installs is not None else None
        return Status(
            device_id=self.device_id,
            online=online,
            ts=time.time(),
            agent_version=f"{AGENT_VERSION}-sim"[:64],
            model_id=model_id,
            model_version=version,
            operating_point=self.operating_point,
            group=self.cfg.group,
            hardware=self.hardware,
            boot_id=self.boot_id,
            bundle_sha256=installs.running.manifest_sha256 if installs is not None else None,
            previous_bundle_sha256=previous.manifest_sha256 if previous is not None else None,
        )

    def telemetry(self, rng: random.Random, start: float, end: float) -> Telemetry:
        """One plausible window at the current operating point (workload.POINTS, or the
        running variant's latency scaled by the device class and the slowdown)."""
        op = self.operating_point
        v = self.variant
        if v is not None:
            p50 = v.point_ms[op] * self.speed * self.slowdown
            w = simulate_variant_window(p50, v.exit_share(op), rng, end - start, self.cpu_count)
        else:
            point = POINTS[op]
            if self.slowdown != 1.0:
                point = dataclasses.replace(point, p50_ms=point.p50_ms * self.slowdown)
            w = simulate_window(point, rng, end - start, self.cpu_count)
        model_id, version = self.model()
        return Telemetry(
            device_id=self.device_id,
            seq=self.next_seq,
            window_start=start,
            window_end=end,
            frames_captured=w.captured,
            frames_processed=w.processed,
            frames_dropped=w.captured - w.processed,
            fps=w.fps,
            latency_ms=w.latency,
            stage_latency_ms=w.stages,
            exit_histogram=w.exits,
            operating_point=op,
            cpu_percent=w.cpu_percent,
            rss_mb=w.rss_mb,
            temperature_c=w.temperature_c,
            throttled=w.temperature_c > 85.0,
            power_w=w.power_w,
            power_source="estimate",
            energy_per_frame_mj=w.power_w / w.fps * 1000.0 if w.fps > 0 else None,
            outbox_depth=len(self.backlog),
            outbox_overflow=self.backlog.overflow,
            model_id=model_id,
            model_version=version,
        )

    def event(self, kind: EventKind, message: str, details: dict[str, Any]) -> Event:
        """The next event of this device (its own sequence)."""
        ev = Event(
            device_id=self.device_id,
            ts=time.time(),
            seq=self.event_seq,
            kind=kind,
            level=_level(kind),
            message=message,
            details=details,
        )
        self.event_seq += 1
        return ev

    # -- producing -----------------------------------------------------------------------

    def enqueue(self, kind: EntryKind, payload: bytes) -> None:
        """Into the backlog; an online device hands it to its connection on the next pump."""
        if self.backlog.add(kind, payload, sending=self.state == "online"):
            self._on_send(self)

    def enqueue_event(self, kind: EventKind, message: str, details: dict[str, Any]) -> None:
        """The next event, into the backlog."""
        self.enqueue(EVENTS, encode(self.event(kind, message, details)))

    def produce(self, rng: random.Random, wall: float) -> None:
        """The next window (and every `events_every` windows a governor move) into the backlog."""
        start = self.window_end
        end = max(wall, start)
        self.window_end = end
        every = self.cfg.events_every
        # With variants the coordinator's loop chooses the point: no simulated governor.
        if every and self.next_seq % every == every - 1 and self.installs is None:
            self.governor_step(rng)
        tele = self.telemetry(rng, start, end)
        self.next_seq += 1
        self.enqueue(TELEMETRY, encode(tele))

    def governor_step(self, rng: random.Random) -> None:
        """The simulated governor moves the operating point as the agent's would."""
        if self.pinned:
            return
        if self.commanded:
            self.commanded = False  # a command just chose the point: keep it for a while
            return
        previous = self.operating_point
        self.operating_point, reason = governor_move(previous, self.default_point, rng)
        self.enqueue_event(
            "operating_point_changed",
            f"governor moved operating point {previous} -> {self.operating_point}: {reason}",
            {"from": previous, "to": self.operating_point, "reason": reason},
        )

    def answer(self, topic: str, payload: bytes) -> None:
        """Answer a command that arrived on `topic`; the reply goes into the backlog.

        As the agent does, a payload that cannot be read at all (not JSON, or no correlation
        id) is answered with ok=False under the id `UNCORRELATED_ID`, logged and counted.
        """
        reply, data = self.handler.answer(topic, payload)
        if not reply.ok and reply.id == UNCORRELATED_ID:
            self.commands_rejected += 1
            log.warning(
                "%s refused an unreadable command on %s (replied under id %r)",
                self.device_id,
                topic,
                UNCORRELATED_ID,
            )
        else:
            self.commands += 1
        log.info("%s answered command %s: ok=%s", self.device_id, reply.id, reply.ok)
        self.enqueue(REPLY, data)

    # -- CommandTarget (agent/commands.py): what the simulated agent can be told ------------

    def set_operating_point(self, index: int, pin: bool) -> dict[str, JsonValue]:
        """Switch (and optionally pin); the next window reports it."""
        count = self.points()
        if not 0 <= index < count:
            raise ValueError(f"operating point {index} does not exist (0..{count - 1})")
        previous, self.operating_point = self.operating_point, index
        self.pinned = pin
        self.commanded = True
        name = POINTS[index].name if self.installs is None else f"of {self.model_label()}"
        self.enqueue_event(
            "operating_point_changed",
            f"operating point {previous} -> {index} ({name}) by command",
            {"from": previous, "to": index, "pinned": pin, "reason": "command"},
        )
        return {"operating_point": index, "previous": previous, "pinned": pin}

    def unpin_operating_point(self) -> dict[str, JsonValue]:
        """Let the simulated governor move again."""
        self.pinned = False
        return {"operating_point": self.operating_point, "pinned": False}

    def set_thresholds(self, thresholds: list[float | None]) -> dict[str, JsonValue]:
        """Accept one threshold per early exit."""
        if len(thresholds) != EXITS - 1:
            raise ValueError(f"expected {EXITS - 1} thresholds (one per early exit)")
        self.thresholds = list(thresholds)
        return {"thresholds": list(thresholds)}

    def set_telemetry_interval(self, seconds: float) -> dict[str, JsonValue]:
        """Takes effect from the next window."""
        self.period = seconds
        return {"interval_s": seconds}

    def snapshot_jpeg(self, quality: int) -> bytes:
        """A simulated device has no camera."""
        raise LookupError("a simulated device has no camera frame")

    def reload_bundle(self) -> dict[str, JsonValue]:
        """Nothing to reload; report the simulated model."""
        model_id, version = self.model()
        return {"model_id": model_id, "version": version}

    def install_bundle(self, cmd: InstallBundle) -> dict[str, JsonValue]:
        """Install one of the configured variants (installs.py); without any, refused."""
        if self.installs is None:
            raise ValueError("simulated devices do not install bundles (no variants configured)")
        return self.installs.install(cmd)

    def rollback_bundle(self, cmd: RollbackBundle) -> dict[str, JsonValue]:
        """Back to the previous variant if the named one runs; without variants, nothing."""
        if self.installs is None:
            return {"rolled_back": False}
        return self.installs.rollback(cmd)

    # -- variants ---------------------------------------------------------------------------

    def model_label(self) -> str:
        """The running model as logs name it."""
        v = self.variant
        return v.label() if v is not None else f"{SIM_MODEL_ID} v1"

    def _switched(self, variant: SimVariant) -> None:
        """Another variant runs from now: at its default point, unpinned, with a new birth."""
        previous = self.operating_point
        self.operating_point = variant.default_point
        self.pinned = False
        self.commanded = False
        log.info(
            "%s runs %s at point %d (was point %d)",
            self.device_id,
            variant.label(),
            variant.default_point,
            previous,
        )
        if self._on_birth is not None:
            self._on_birth(self)


def _level(kind: EventKind) -> Literal["info", "error", "warning"]:
    """An event's level, as the agent sets it (agent/service.py)."""
    if kind in ("error", "rollback"):
        return "error"
    if kind.endswith("lost") or kind in ("outbox_overflow", "keys_refused"):
        return "warning"
    return "info"
