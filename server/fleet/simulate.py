"""Fleet simulator: many simulated agents, each with its own MQTT connection, in one thread.

Every simulated device behaves on the wire like `agent/link.py`: its own paho client (client id =
device id, MQTT 5, no session kept across connections), a retained birth `Status` on every
(re)connect, the retained offline `Status` as Last Will, QoS 1 `Telemetry` windows with per-device
sequence numbers and occasional `Event`s, and `Reply`s to the `Command`s on its cmd topic (and its
group's). While a device is disconnected it keeps producing windows into a bounded in-memory
backlog that mirrors the agent's outbox: an entry leaves it only when its PUBACK arrives, and after
a reconnect the backlog is replayed from its head, in order, so a coordinator sees no gaps.

All clients of one process are driven by ONE thread: a selector loop over paho's external-loop
API (`socket()`, `loop_read()`, `loop_write()`, `loop_misc()`, `want_write()` and the
`on_socket_*` callbacks), so 1,000 devices cost one thread, not 1,000 paho network threads.
`run_simulation(..., procs=K)` spreads the devices over K processes for more throughput.

As the agent does, a command payload that cannot be read at all (not JSON, or no correlation
id) is answered with ok=False under the id `UNCORRELATED_ID`, logged with the device id and
counted in `DeviceStats.commands_rejected`; a readable id with a bad body gets ok=False.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import multiprocessing
import random
import resource
import selectors
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from multiprocessing.synchronize import Barrier as BarrierT
from multiprocessing.synchronize import Event as EventT
from typing import TYPE_CHECKING, Any, Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import JsonValue

from edgefleet.agent import __version__ as AGENT_VERSION
from edgefleet.agent.commands import CommandHandler
from edgefleet.agent.protocol import (
    UNCORRELATED_ID,
    Event,
    EventKind,
    Hardware,
    Percentiles,
    Status,
    Telemetry,
    TopicTree,
    check_id,
    encode,
    offline_will,
)

if TYPE_CHECKING:
    from multiprocessing.queues import Queue as QueueT

log = logging.getLogger(__name__)

# Per device; the agent uses 64, but 16 stays under the Receive Maximum of strict brokers (20 by
# default on many) with room for the birth, and is plenty on loopback (acks take ~1 ms).
MAX_INFLIGHT: Final = 16
KEEPALIVE_S: Final = 60
# paho's TCP connect blocks the loop; short, so an unreachable host stalls it little.
CONNECT_TIMEOUT_S: Final = 2.0
CONNACK_TIMEOUT_S: Final = 10.0
# Shorter than the agent's 1..30 s backoff so that tests and benchmarks recover within seconds
# of a broker restart; the global gate below still keeps a dead broker from being hammered.
RETRY_MIN_S: Final = 0.25
RETRY_MAX_S: Final = 2.0
MAX_CONNECTING: Final = 256  # handshakes in progress at once
PRODUCE_BUDGET: Final = 2_000  # windows per loop turn, so I/O keeps up when the loop is overloaded
MISC_EVERY_S: Final = 1.0
SIM_MODEL_ID: Final = "simnet"
OPERATING_POINTS: Final = 4
EXITS: Final = 3  # two early exits and the final head
CAMERA_FPS: Final = 30.0

_TELEMETRY: Final = "telemetry"
_EVENTS: Final = "events"
_REPLY: Final = "reply"
EntryKind = Literal["telemetry", "events", "reply"]
DeviceState = Literal["waiting", "connecting", "online", "held", "stopped"]

_BOARDS: Final = (
    ("aarch64", 4, 8_064.0, "Raspberry Pi 5 Model B Rev 1.0", ()),
    ("aarch64", 4, 3_796.0, "Raspberry Pi 4 Model B Rev 1.5", ()),
    ("aarch64", 6, 7_620.0, "NVIDIA Jetson Orin Nano Developer Kit", ("CUDAExecutionProvider",)),
    ("x86_64", 4, 15_842.0, "Intel NUC11TNHi5", ("OpenVINOExecutionProvider",)),
)


# -- public configuration and results -------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """What to simulate and where: `devices` agents sending `rate` windows per second each."""

    host: str
    port: int
    devices: int
    rate: float  # windows/s per device
    root: str = "edgefleet/v1"
    prefix: str = "sim"
    group: str | None = None
    events_every: int = 50  # one event per this many windows (0: none)
    backlog_limit: int = 10_000
    first_index: int = 0  # device ids start at {prefix}-{first_index:05d}; set per process
    connect_rate: float = 400.0  # new connections per second, so the broker is not flooded
    seed: int | None = None  # for reproducible telemetry values

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 windows/s, got {self.rate}")
        if self.backlog_limit < 1:
            raise ValueError(f"backlog_limit must be >= 1, got {self.backlog_limit}")
        if self.events_every < 0:
            raise ValueError(f"events_every must be >= 0, got {self.events_every}")
        if not self.connect_rate > 0:
            raise ValueError(f"connect_rate must be > 0, got {self.connect_rate}")
        if self.first_index < 0:
            raise ValueError(f"first_index must be >= 0, got {self.first_index}")
        check_id(device_id(self.prefix, self.first_index + self.devices - 1), "device id")
        if self.group is not None:
            check_id(self.group, "group name")
        TopicTree(self.root)  # validates the root

    def device_ids(self) -> list[str]:
        """The ids of the devices this config simulates, in index order."""
        return [device_id(self.prefix, i) for i in self._indices()]

    def _indices(self) -> range:
        return range(self.first_index, self.first_index + self.devices)


def device_id(prefix: str, index: int) -> str:
    """The id of simulated device number `index`: `{prefix}-{index:05d}`."""
    return f"{prefix}-{index:05d}"


@dataclass(frozen=True)
class DeviceStats:
    """Counters of one simulated device."""

    device_id: str
    next_seq: int  # windows produced; the next window gets this seq
    acked: int  # windows whose PUBACK arrived
    backlog: int  # messages (windows, events, replies) not yet acknowledged
    overflow: int  # messages dropped because the backlog was full
    online: bool
    connects: int  # successful connections (CONNACK ok)
    events: int  # events produced
    commands: int  # commands answered with a reply
    commands_rejected: int  # command payloads without a readable id (answered uncorrelated)


@dataclass(frozen=True)
class SimStats:
    """A consistent snapshot of every device's counters, with totals."""

    devices: tuple[DeviceStats, ...]

    @property
    def produced(self) -> int:
        """Windows produced by all devices."""
        return sum(d.next_seq for d in self.devices)

    @property
    def acked(self) -> int:
        """Windows acknowledged by the broker."""
        return sum(d.acked for d in self.devices)

    @property
    def backlog(self) -> int:
        """Messages waiting for a PUBACK, all devices."""
        return sum(d.backlog for d in self.devices)

    @property
    def overflow(self) -> int:
        """Messages dropped for a full backlog, all devices."""
        return sum(d.overflow for d in self.devices)

    @property
    def online(self) -> int:
        """Devices connected now."""
        return sum(1 for d in self.devices if d.online)

    @property
    def connects(self) -> int:
        """Successful connections, all devices (first connects included)."""
        return sum(d.connects for d in self.devices)

    def by_id(self) -> dict[str, DeviceStats]:
        """The snapshot keyed by device id."""
        return {d.device_id: d for d in self.devices}


@dataclass(frozen=True)
class Progress:
    """One progress line of a running simulation."""

    elapsed_s: float
    produced: int
    acked: int
    backlog: int
    online: int
    devices: int


@dataclass(frozen=True)
class SimReport:
    """Result of `run_simulation`; the rates cover the measured `duration_s` only."""

    devices: int
    procs: int
    duration_s: float  # measured period, after every device had connected
    connect_s: float  # time to connect every device (slowest process)
    produced: int  # windows produced over the whole run (connect phase and final drain included)
    acked: int
    overflow: int
    backlog: int  # messages still unacknowledged at the end (0 when drained)
    publish_rate: float  # acknowledged windows per second during duration_s
    produce_rate: float  # produced windows per second during duration_s
    reconnects: int  # connections beyond each device's first
    offline_bursts: int  # --loss-burst rounds
    taken_offline: int  # device outages caused by --loss-burst
    drained: bool  # every produced window acknowledged (or counted as overflow) at the end

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


# -- one simulated device ----------------------------------------------------------------------


class _Entry:
    """One backlog message: what to publish and what it counts as."""

    __slots__ = ("kind", "payload")

    def __init__(self, kind: EntryKind, payload: bytes) -> None:
        self.kind = kind
        self.payload = payload


class _Device:
    """State of one simulated agent; touched only by the loop thread (or under its lock)."""

    def __init__(self, sim: Simulator, index: int, position: int) -> None:
        cfg = sim.cfg
        self.sim = sim
        self.index = index
        self.position = position  # 0..devices-1 inside this simulator
        self.device_id = device_id(cfg.prefix, index)
        tree = sim.tree
        self.topics: dict[str, str] = {
            kind: tree.device(self.device_id, kind)
            for kind in ("status", "telemetry", "events", "reply", "cmd")
        }
        self.group_topic = tree.group_cmd(cfg.group) if cfg.group else None
        machine, cpus, ram, board, accel = _BOARDS[index % len(_BOARDS)]
        self.hardware = Hardware(
            machine=machine,
            system="Linux",
            cpu_count=cpus,
            ram_mb=ram,
            accelerators=list(accel),
            device_model=board,
        )
        self.boot_id = str(uuid.uuid4())  # one per simulated agent start
        self.cpu_count = cpus
        self.client: mqtt.Client | None = None
        self.session_birth: Status | None = None  # birth of the current connection
        self.state: DeviceState = "waiting"
        self.connect_started = 0.0
        self.retry_delay = 0.0
        self.connects = 0
        self.disconnected_at: float | None = None
        # The outbox mirror: key -> entry in production order; keys are local message numbers.
        self.pending: OrderedDict[int, _Entry] = OrderedDict()
        self.next_key = 0
        self.send_queue: deque[int] = deque()  # keys not yet handed to paho on this connection
        self.inflight: dict[int, int] = {}  # paho mid -> key
        self.queued_windows = 0
        self.next_seq = 0
        self.acked = 0
        self.overflow = 0
        self.event_seq = 0
        self.commands = 0
        self.commands_rejected = 0
        self.stop_mid: int | None = None
        # The simulated workload.
        self.period = 1.0 / cfg.rate
        self.window_end = 0.0  # wall time the next window starts at
        self.operating_point = index % OPERATING_POINTS
        self.pinned = False
        self.commanded = False  # a command moved the operating point; the governor waits once
        self.thresholds: list[float | None] = [0.8, 0.9]
        self.handler = CommandHandler(self.device_id, self)

    # -- payloads ----------------------------------------------------------------------

    def birth(self, online: bool = True) -> Status:
        """The status this device publishes now (retained birth, or offline when stopping)."""
        return Status(
            device_id=self.device_id,
            online=online,
            ts=time.time(),
            agent_version=f"{AGENT_VERSION}-sim"[:64],
            model_id=SIM_MODEL_ID,
            model_version=1,
            operating_point=self.operating_point,
            group=self.sim.cfg.group,
            hardware=self.hardware,
            boot_id=self.boot_id,
        )

    def telemetry(self, rng: random.Random, start: float, end: float) -> Telemetry:
        """One plausible window: slower, more accurate operating points have higher index."""
        duration = end - start
        op = self.operating_point
        captured = round(CAMERA_FPS * duration)
        target_fps = max(1.0, (30.0 - 4.0 * op) * rng.uniform(0.9, 1.05))
        processed = min(captured, round(target_fps * duration))
        fps = processed / duration if duration > 0 else 0.0
        if processed:
            p50 = (12.0 + 6.0 * op) * rng.uniform(0.9, 1.1)
            p95 = p50 * rng.uniform(1.2, 1.5)
            p99 = p95 * rng.uniform(1.05, 1.3)
        else:
            p50 = p95 = p99 = 0.0
        latency = Percentiles(p50=p50, p95=p95, p99=p99)
        stages = [
            Percentiles(p50=p50 * share, p95=p95 * share, p99=p99 * share) for share in (0.6, 0.4)
        ]
        early = int(processed * max(0.05, 0.55 - 0.12 * op))
        middle = int((processed - early) * 0.4)
        cpu = min(100.0 * self.cpu_count, (55.0 + 15.0 * op) * rng.uniform(0.85, 1.15))
        power = 2.4 + 0.012 * cpu + rng.uniform(-0.1, 0.1)
        temperature = 42.0 + 0.25 * cpu + rng.uniform(-1.0, 1.0)
        return Telemetry(
            device_id=self.device_id,
            seq=self.next_seq,
            window_start=start,
            window_end=end,
            frames_captured=captured,
            frames_processed=processed,
            frames_dropped=captured - processed,
            fps=fps,
            latency_ms=latency,
            stage_latency_ms=stages,
            exit_histogram=[early, middle, processed - early - middle],
            operating_point=op,
            cpu_percent=cpu,
            rss_mb=180.0 + rng.uniform(0.0, 8.0),
            temperature_c=min(temperature, 200.0),
            throttled=temperature > 85.0,
            power_w=power,
            power_source="estimate",
            energy_per_frame_mj=power / fps * 1000.0 if fps > 0 else None,
            outbox_depth=len(self.pending),
            outbox_overflow=self.overflow,
            model_id=SIM_MODEL_ID,
            model_version=1,
        )

    def event(self, kind: EventKind, message: str, details: dict[str, Any]) -> Event:
        """The next event of this device (its own sequence)."""
        ev = Event(
            device_id=self.device_id,
            ts=time.time(),
            seq=self.event_seq,
            kind=kind,
            level="info",
            message=message,
            details=details,
        )
        self.event_seq += 1
        return ev

    # -- CommandTarget (agent/commands.py): what the simulated agent can be told ------------

    def set_operating_point(self, index: int, pin: bool) -> dict[str, JsonValue]:
        """Switch (and optionally pin); the next window reports it."""
        if not 0 <= index < OPERATING_POINTS:
            raise ValueError(f"operating point {index} does not exist (0..{OPERATING_POINTS - 1})")
        previous, self.operating_point = self.operating_point, index
        self.pinned = pin
        self.commanded = True
        self.sim._enqueue_event(
            self,
            "operating_point_changed",
            f"operating point {previous} -> {index} by command",
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
        return {"model_id": SIM_MODEL_ID, "version": 1}


# -- the simulator ---------------------------------------------------------------------------


class Simulator:
    """N simulated devices driven by one background thread with a selector loop."""

    def __init__(self, cfg: SimConfig) -> None:
        """Prepare the devices; nothing connects before `start`."""
        self.cfg = cfg
        self.tree = TopicTree(cfg.root)
        self._rng = random.Random(cfg.seed)
        self._devices = [_Device(self, i, pos) for pos, i in enumerate(cfg._indices())]
        self._by_id = {d.device_id: d for d in self._devices}
        self._lock = threading.Lock()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r.fileno(), selectors.EVENT_READ, None)
        self._write_fds: set[int] = set()
        self._loop_closed = False
        self._dirty: set[mqtt.Client] = set()  # clients with packets to write
        self._to_pump: set[_Device] = set()  # devices with backlog to hand to paho
        self._actions: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._connect_heap: list[tuple[float, int]] = []  # (not before, position)
        self._connect_tokens = 1.0
        self._connect_tick = 0.0
        self._gate_until = 0.0  # no connect attempts before this (broker refused recently)
        self._gate_delay = 0.0
        self._connecting: set[_Device] = set()
        self._produce_heap: list[tuple[float, int]] = []  # (due, position)
        self._paused = False
        self._phase: Literal["new", "running", "draining", "disconnecting", "done"] = "new"
        self._phase_deadline = 0.0
        self._next_misc = 0.0
        self._thread: threading.Thread | None = None
        self._crashed: BaseException | None = None
        self.last_error: str | None = None  # last connection error, for the start timeout
        self._all_connected_logged = False
        self._started_at = 0.0

    # -- public API ---------------------------------------------------------------------

    def device_ids(self) -> list[str]:
        """Ids of the simulated devices, in index order."""
        return [d.device_id for d in self._devices]

    def start(self, timeout: float | None = None) -> None:
        """Start producing and connecting; return once every device is connected.

        Raises TimeoutError naming how many connected (and the last connection error) when
        they are not all connected within `timeout` seconds (default: scaled to the fleet).
        """
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        _raise_fd_limit(len(self._devices) + 256)
        if timeout is None:
            timeout = 10.0 + 2.0 * len(self._devices) / self.cfg.connect_rate
        now = time.monotonic()
        wall = time.time()
        self._started_at = now
        self._connect_tick = now
        for dev in self._devices:
            dev.window_end = wall
            heapq.heappush(self._connect_heap, (now, dev.position))
        self._schedule_production(now)
        self._phase = "running"
        self._thread = threading.Thread(target=self._run, name="simulate-loop", daemon=True)
        self._thread.start()
        deadline = now + timeout
        while time.monotonic() < deadline:
            with self._lock:
                online = sum(1 for d in self._devices if d.state == "online")
            if online == len(self._devices):
                return
            if self._crashed is not None:
                raise RuntimeError(f"simulator loop failed: {self._crashed!r}")
            time.sleep(0.02)
        with self._lock:
            online = sum(1 for d in self._devices if d.state == "online")
        error = self.last_error
        self.stop(graceful=False)
        raise TimeoutError(
            f"only {online} of {len(self._devices)} simulated devices connected to "
            f"{self.cfg.host}:{self.cfg.port} within {timeout:.1f} s"
            + (f" (last error: {error})" if error else "")
        )

    def stop(self, graceful: bool = True) -> None:
        """Stop producing and disconnect every device.

        graceful: publish each device's retained offline status and send DISCONNECT, so no
        Last Will fires; otherwise the sockets are dropped and the broker sends the wills.
        The backlog (unacknowledged messages) is kept in the counters, like the agent's outbox.
        """
        thread = self._thread
        if thread is None:
            self._phase = "done"
            self._close_loop()
            return
        if not thread.is_alive():
            return
        self._call(lambda: self._begin_stop(graceful), timeout=10.0)
        thread.join(15.0)
        if thread.is_alive():
            log.error("simulator loop did not stop within 15 s")

    def take_offline(self, device_ids: list[str]) -> None:
        """Drop these devices' connections ungracefully (wills fire); they keep producing."""
        devs = self._lookup(device_ids)
        self._call(lambda: self._take_offline(devs))

    def bring_online(self, device_ids: list[str]) -> None:
        """Let these devices reconnect: birth, then the backlog replays in order."""
        devs = self._lookup(device_ids)
        self._call(lambda: self._bring_online(devs))

    def pause(self) -> None:
        """Stop producing windows (connections and replay go on); effective on return."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Produce windows again, the next ones starting now."""
        with self._lock:
            if self._paused:
                self._paused = False
                self._schedule_production(time.monotonic())

    def produce_now(self, windows: int = 1, device_ids: list[str] | None = None) -> None:
        """Produce `windows` windows per device immediately, paused or not (for exact counts)."""
        devs = self._lookup(device_ids) if device_ids is not None else list(self._devices)
        with self._lock:
            for dev in devs:
                for _ in range(windows):
                    self._produce(dev, time.time())
        self._wake()

    def stats(self) -> SimStats:
        """A consistent snapshot of every device's counters."""
        with self._lock:
            return SimStats(tuple(self._device_stats(d) for d in self._devices))

    def wait_drained(self, timeout: float) -> bool:
        """Wait until no device has an unacknowledged message; False on timeout.

        Windows dropped for a full backlog count as drained (they are in `overflow`).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if all(not d.pending for d in self._devices):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # -- helpers of the public API ------------------------------------------------------

    def _lookup(self, device_ids: Iterable[str]) -> list[_Device]:
        try:
            return [self._by_id[i] for i in device_ids]
        except KeyError as exc:
            raise ValueError(f"unknown simulated device {exc.args[0]!r}") from None

    def _call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run fn on the loop thread and wait for it (paho clients are not thread-safe)."""
        if threading.current_thread() is self._thread:
            fn()
            return
        done = threading.Event()
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            if not running:
                fn()  # no loop: nothing else touches the devices
                return
            self._actions.append((fn, done))
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError("the simulator loop did not run the request in time")

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    @staticmethod
    def _device_stats(d: _Device) -> DeviceStats:
        return DeviceStats(
            device_id=d.device_id,
            next_seq=d.next_seq,
            acked=d.acked,
            backlog=len(d.pending),
            overflow=d.overflow,
            online=d.state == "online",
            connects=d.connects,
            events=d.event_seq,
            commands=d.commands,
            commands_rejected=d.commands_rejected,
        )

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._phase != "done":
                events = self._sel.select(self._timeout())
                with self._lock:
                    self._turn(events)
        except BaseException as exc:  # recorded for start(); the loop has no caller to raise to
            self._crashed = exc
            log.exception("simulator loop crashed")
        finally:
            with self._lock:
                for dev in self._devices:
                    self._drop(dev, "stopped")
            self._close_loop()

    def _close_loop(self) -> None:
        """Release the selector and the wake-up pair (idempotent)."""
        with self._lock:
            if self._loop_closed:
                return
            self._loop_closed = True
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _timeout(self) -> float:
        """Seconds until the loop has something to do without network input."""
        now = time.monotonic()
        wake = now + MISC_EVERY_S
        if self._produce_heap and not self._paused and self._phase == "running":
            wake = min(wake, self._produce_heap[0][0])
        if (
            self._connect_heap
            and self._phase == "running"
            and len(self._connecting) < MAX_CONNECTING  # else a CONNACK wakes the loop
        ):
            # Not before the gate opens, nor before the pacing allows the next attempt.
            paced = now + max(0.0, 1.0 - self._connect_tokens) / self.cfg.connect_rate
            wake = min(wake, max(self._connect_heap[0][0], self._gate_until, paced))
        if self._phase in ("draining", "disconnecting"):
            wake = min(wake, now + 0.05)
        return max(0.0, wake - now)

    def _turn(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        """One loop iteration, under the lock."""
        for key, mask in events:
            client = key.data
            if client is None:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            assert isinstance(client, mqtt.Client)
            self._service(client, mask)
        while self._actions:
            fn, done = self._actions.popleft()
            try:
                fn()
            except Exception:
                log.exception("simulator request failed")
            done.set()
        now = time.monotonic()
        if self._phase == "running":
            self._connect_due(now)
            if not self._paused:
                self._produce_due(now)
        elif self._phase in ("draining", "disconnecting"):
            self._stop_progress(now)
        if now >= self._next_misc:
            self._next_misc = now + MISC_EVERY_S
            self._misc(now)
        self._pump_all()
        self._flush()

    def _service(self, client: mqtt.Client, mask: int) -> None:
        """Read and write one client's socket as the selector reported."""
        dev = client.user_data_get()
        assert isinstance(dev, _Device)
        try:
            if mask & selectors.EVENT_READ and dev.client is client:
                client.loop_read()
            # A callback of the read may have dropped the connection: check again.
            if mask & selectors.EVENT_WRITE and dev.client is client:
                client.loop_write()
                if not client.want_write():
                    self._unwatch_write(client)
        except Exception:
            log.exception("%s: network handling failed; reconnecting", dev.device_id)
            if dev.client is client:
                self._lost(dev, "internal error")

    def _flush(self) -> None:
        """Write what paho queued; watch for writability only where the socket is full."""
        dirty, self._dirty = self._dirty, set()
        for client in dirty:
            sock = client.socket()
            if sock is None:
                continue
            try:
                client.loop_write()
            except Exception:
                dev = client.user_data_get()
                assert isinstance(dev, _Device)
                log.exception("%s: write failed; reconnecting", dev.device_id)
                if dev.client is client:
                    self._lost(dev, "internal error")
                continue
            if client.want_write() and client.socket() is not None:
                fd = sock.fileno()
                if fd not in self._write_fds:
                    self._sel.modify(fd, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                    self._write_fds.add(fd)

    def _unwatch_write(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        if fd in self._write_fds:
            self._write_fds.discard(fd)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(fd, selectors.EVENT_READ, client)

    def _misc(self, now: float) -> None:
        """Keepalive pings and handshake timeouts."""
        for dev in self._devices:
            client = dev.client
            if client is None:
                continue
            if dev.state == "connecting" and now - dev.connect_started > CONNACK_TIMEOUT_S:
                log.warning("%s: no CONNACK within %.0f s", dev.device_id, CONNACK_TIMEOUT_S)
                self._lost(dev, "CONNACK timeout")
                continue
            try:
                client.loop_misc()
            except Exception:
                log.exception("%s: keepalive handling failed", dev.device_id)
                if dev.client is client:
                    self._lost(dev, "internal error")

    # -- connections --------------------------------------------------------------------

    def _connect_due(self, now: float) -> None:
        """Open connections that are due, paced by connect_rate and the failure gate."""
        rate = self.cfg.connect_rate
        # Bursts up to a quarter second's worth, so a long loop turn does not halve the rate.
        self._connect_tokens = min(
            max(1.0, rate * 0.25), self._connect_tokens + (now - self._connect_tick) * rate
        )
        self._connect_tick = now
        heap = self._connect_heap
        while (
            heap
            and heap[0][0] <= now
            and now >= self._gate_until
            and self._connect_tokens >= 1.0
            and len(self._connecting) < MAX_CONNECTING
        ):
            _, position = heapq.heappop(heap)
            dev = self._devices[position]
            if dev.state != "waiting" or dev.client is not None:
                continue  # stale entry: the device was held or is already connecting
            self._connect_tokens -= 1.0
            self._open(dev, now)

    def _open(self, dev: _Device, now: float) -> None:
        """One connection attempt with a fresh paho client (no state from older connections)."""
        cfg = self.cfg
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=dev.device_id,
            protocol=mqtt.MQTTv5,
            userdata=dev,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.max_inflight_messages_set(0)  # we limit in-flight ourselves (MAX_INFLIGHT)
        # The will is exactly this connection's birth with online=False (agent/link.py).
        birth = dev.session_birth = dev.birth()
        client.will_set(dev.topics["status"], encode(offline_will(birth)), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        dev.client = client
        dev.state = "connecting"
        dev.connect_started = now
        self._connecting.add(dev)
        try:
            # clean_start: like the agent (paho's default plus no session expiry), the broker
            # keeps no session between connections; what was in flight replays from the backlog.
            client.connect(cfg.host, cfg.port, keepalive=KEEPALIVE_S, clean_start=True)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._close_socket(dev)
            dev.client = None
            self._connecting.discard(dev)
            dev.state = "waiting"
            self._retry_later(dev, now)
            # The broker is probably down: hold every attempt for a moment, growing.
            self._gate_delay = min(RETRY_MAX_S, max(0.1, self._gate_delay * 2))
            self._gate_until = now + self._gate_delay
            log.debug("%s: connect failed: %s", dev.device_id, exc)

    def _retry_later(self, dev: _Device, now: float) -> None:
        dev.retry_delay = min(RETRY_MAX_S, max(RETRY_MIN_S, dev.retry_delay * 2))
        when = now + dev.retry_delay * self._rng.uniform(0.5, 1.0)  # jitter: no thundering herd
        heapq.heappush(self._connect_heap, (when, dev.position))

    def _close_socket(self, dev: _Device) -> None:
        """Unregister and close dev's socket without telling paho: an ungraceful drop."""
        client = dev.client
        sock = client.socket() if client is not None else None
        if sock is None:
            return
        fd = sock.fileno()
        self._write_fds.discard(fd)
        if not self._loop_closed:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        with contextlib.suppress(OSError):
            sock.close()

    def _drop(self, dev: _Device, state: DeviceState) -> None:
        """Forget dev's connection (the broker sees the socket close) and set its state."""
        was_online = dev.state == "online"
        self._close_socket(dev)
        if dev.client is not None:
            self._dirty.discard(dev.client)
        dev.client = None  # its late callbacks now fail the identity check
        dev.inflight.clear()
        dev.send_queue.clear()
        self._connecting.discard(dev)
        self._to_pump.discard(dev)
        dev.state = state
        if was_online:
            dev.disconnected_at = time.monotonic()

    def _lost(self, dev: _Device, why: str) -> None:
        """An unexpected loss: forget the connection and reconnect later."""
        if dev.state == "online":
            log.warning(
                "%s disconnected (%s), %d messages in backlog", dev.device_id, why, len(dev.pending)
            )
        self._drop(dev, "waiting")
        if self._phase == "running":
            self._retry_later(dev, time.monotonic())
        else:
            dev.state = "stopped"

    def _take_offline(self, devs: list[_Device]) -> None:
        for dev in devs:
            if dev.state in ("held", "stopped"):
                continue
            self._drop(dev, "held")
            log.info(
                "%s taken offline (ungraceful; its will fires), backlog %d",
                dev.device_id,
                len(dev.pending),
            )

    def _bring_online(self, devs: list[_Device]) -> None:
        now = time.monotonic()
        for dev in devs:
            if dev.state != "held":
                continue
            dev.state = "waiting"
            dev.retry_delay = 0.0
            heapq.heappush(self._connect_heap, (now, dev.position))
            log.info("%s coming back online, backlog %d", dev.device_id, len(dev.pending))

    # -- paho callbacks (loop thread); the identity checks ignore discarded clients ---------

    def _on_socket_open(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        if dev.client is client:
            self._sel.register(sock.fileno(), selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        if dev.client is client:
            fd = sock.fileno()
            self._write_fds.discard(fd)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)

    def _on_socket_register_write(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        # Written at the end of the loop turn; the selector watches writability only if the
        # socket buffer is full then, which saves an epoll_ctl pair per burst.
        if dev.client is client:
            self._dirty.add(client)

    def _on_socket_unregister_write(self, client: mqtt.Client, dev: _Device, sock: Any) -> None:
        if dev.client is client:
            self._unwatch_write(client)

    def _on_connect(
        self,
        client: mqtt.Client,
        dev: _Device,
        _flags: mqtt.ConnectFlags,
        rc: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if dev.client is not client:
            return
        self._connecting.discard(dev)
        if rc.is_failure:
            self.last_error = f"broker refused {dev.device_id}: {rc}"
            log.error("%s: broker refused the connection: %s", dev.device_id, rc)
            self._lost(dev, str(rc))
            return
        first = dev.connects == 0
        dev.connects += 1
        dev.retry_delay = 0.0
        self._gate_delay = 0.0
        dev.state = "online"
        birth = dev.session_birth or dev.birth()
        client.publish(dev.topics["status"], encode(birth), qos=1, retain=True)
        subs: list[tuple[str, int]] = [(dev.topics["cmd"], 1)]
        if dev.group_topic:
            subs.append((dev.group_topic, 1))
        client.subscribe(subs)
        dev.inflight.clear()
        dev.send_queue = deque(dev.pending.keys())
        self._to_pump.add(dev)
        if first:
            log.debug("%s connected", dev.device_id)
        else:
            away = (
                f" after {time.monotonic() - dev.disconnected_at:.1f} s"
                if dev.disconnected_at is not None
                else ""
            )
            log.info(
                "%s reconnected%s, replaying %d windows (%d messages)",
                dev.device_id,
                away,
                dev.queued_windows,
                len(dev.pending),
            )
        if not self._all_connected_logged and all(d.connects for d in self._devices):
            self._all_connected_logged = True
            log.info(
                "all %d simulated devices connected in %.1f s",
                len(self._devices),
                time.monotonic() - self._started_at,
            )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        dev: _Device,
        flags: mqtt.DisconnectFlags,
        rc: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if dev.client is not client:
            return
        if self._phase in ("draining", "disconnecting"):
            self._drop(dev, "stopped")
            return
        # paho reports a dropped socket as "Unspecified error"; say what happened.
        self._lost(dev, f"broker: {rc}" if flags.is_disconnect_packet_from_server else "lost")

    def _on_publish(
        self, client: mqtt.Client, dev: _Device, mid: int, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if dev.client is not client:
            return
        key = dev.inflight.pop(mid, None)
        if key is None:
            if mid == dev.stop_mid:
                dev.stop_mid = None
            return  # the birth, or something not tracked
        if rc.is_failure:  # nothing to gain from resending what the broker refuses
            log.warning("%s: broker refused a message: %s", dev.device_id, rc)
        entry = dev.pending.pop(key, None)
        if entry is not None and entry.kind == _TELEMETRY:
            dev.acked += 1
            dev.queued_windows -= 1
        self._to_pump.add(dev)

    def _on_message(self, client: mqtt.Client, dev: _Device, msg: mqtt.MQTTMessage) -> None:
        if dev.client is not client:
            return
        payload = bytes(msg.payload)
        reply, data = dev.handler.answer(msg.topic, payload)
        if not reply.ok and reply.id == UNCORRELATED_ID:
            dev.commands_rejected += 1
            log.warning(
                "%s refused an unreadable command on %s (replied under id %r)",
                dev.device_id,
                msg.topic,
                UNCORRELATED_ID,
            )
        else:
            dev.commands += 1
        log.info("%s answered command %s: ok=%s", dev.device_id, reply.id, reply.ok)
        self._enqueue(dev, _REPLY, data)

    # -- producing and sending ----------------------------------------------------------

    def _schedule_production(self, now: float) -> None:
        """Spread the devices' next windows over one period so the load is smooth."""
        wall = time.time()
        n = len(self._devices)
        heap: list[tuple[float, int]] = []
        for dev in self._devices:
            dev.window_end = max(dev.window_end, wall)
            heap.append((now + dev.period * (dev.position + 1) / n, dev.position))
        heapq.heapify(heap)
        self._produce_heap = heap

    def _produce_due(self, now: float) -> None:
        heap = self._produce_heap
        budget = PRODUCE_BUDGET
        wall = time.time()
        while heap and heap[0][0] <= now and budget > 0:
            due, position = heap[0]
            dev = self._devices[position]
            self._produce(dev, wall)
            budget -= 1
            nxt = due + dev.period
            if nxt <= now:
                nxt = now + dev.period  # more than a period behind: skip, the window gets longer
            heapq.heapreplace(heap, (nxt, position))

    def _produce(self, dev: _Device, wall: float) -> None:
        """Produce dev's next window (and maybe an event) into its backlog."""
        start = dev.window_end
        end = max(wall, start)
        dev.window_end = end
        every = self.cfg.events_every
        if every and dev.next_seq % every == every - 1:
            self._governor_step(dev)
        tele = dev.telemetry(self._rng, start, end)
        dev.next_seq += 1
        self._enqueue(dev, _TELEMETRY, encode(tele))

    def _governor_step(self, dev: _Device) -> None:
        """The simulated on-device tuner moves the operating point now and then."""
        if dev.pinned:
            return
        if dev.commanded:
            dev.commanded = False  # a command just chose the point: keep it for a while
            return
        previous = dev.operating_point
        step = self._rng.choice((-1, 1))
        dev.operating_point = min(OPERATING_POINTS - 1, max(0, previous + step))
        if dev.operating_point == previous:
            dev.operating_point = previous - step
        self._enqueue_event(
            dev,
            "operating_point_changed",
            f"governor moved operating point {previous} -> {dev.operating_point}",
            {"from": previous, "to": dev.operating_point, "reason": "simulated governor"},
        )

    def _enqueue_event(
        self, dev: _Device, kind: EventKind, message: str, details: dict[str, Any]
    ) -> None:
        self._enqueue(dev, _EVENTS, encode(dev.event(kind, message, details)))

    def _enqueue(self, dev: _Device, kind: EntryKind, payload: bytes) -> None:
        """Add to dev's backlog, evicting the oldest window when full (like the agent's outbox)."""
        pending = dev.pending
        if len(pending) >= self.cfg.backlog_limit:
            victim = next((k for k, e in pending.items() if e.kind == _TELEMETRY), None)
            dev.overflow += 1
            if victim is None:
                return  # only events and replies left: drop the new message instead
            del pending[victim]
            dev.queued_windows -= 1
        key = dev.next_key
        dev.next_key += 1
        pending[key] = _Entry(kind, payload)
        if kind == _TELEMETRY:
            dev.queued_windows += 1
        if dev.state == "online":
            dev.send_queue.append(key)
            self._to_pump.add(dev)

    def _pump_all(self) -> None:
        to_pump, self._to_pump = self._to_pump, set()
        for dev in to_pump:
            self._pump(dev)

    def _pump(self, dev: _Device) -> None:
        """Hand the backlog to paho in order, keeping at most MAX_INFLIGHT unacknowledged."""
        client = dev.client
        if client is None or dev.state != "online":
            return
        queue = dev.send_queue
        topics = dev.topics
        while queue and len(dev.inflight) < MAX_INFLIGHT:
            key = queue[0]
            entry = dev.pending.get(key)
            if entry is None:  # evicted for overflow
                queue.popleft()
                continue
            info = client.publish(topics[entry.kind], entry.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # connection going away; the entry replays on the next one
            queue.popleft()
            dev.inflight[info.mid] = key

    # -- stopping -----------------------------------------------------------------------

    def _begin_stop(self, graceful: bool) -> None:
        self._paused = True
        if not graceful:
            for dev in self._devices:
                self._drop(dev, "stopped")
            self._phase = "done"
            log.info("simulator stopped: %d connections dropped (wills fire)", len(self._devices))
            return
        for dev in self._devices:
            client = dev.client
            if dev.state == "online" and client is not None:
                info = client.publish(
                    dev.topics["status"], encode(dev.birth(online=False)), qos=1, retain=True
                )
                dev.stop_mid = info.mid
            else:
                self._drop(dev, "stopped")
        self._phase = "draining"
        self._phase_deadline = time.monotonic() + 5.0

    def _stop_progress(self, now: float) -> None:
        """Graceful stop: wait for the offline statuses' PUBACKs, then DISCONNECT everyone."""
        if self._phase == "draining":
            waiting = any(d.stop_mid is not None and d.client is not None for d in self._devices)
            if waiting and now < self._phase_deadline:
                return
            for dev in self._devices:
                if dev.client is not None:
                    dev.client.disconnect()
            self._phase = "disconnecting"
            self._phase_deadline = now + 3.0
            return
        if any(d.client is not None for d in self._devices) and now < self._phase_deadline:
            return
        for dev in self._devices:
            self._drop(dev, "stopped")
        self._phase = "done"
        log.info("simulator stopped gracefully (%d devices)", len(self._devices))


def _raise_fd_limit(need: int) -> None:
    """Each device holds a socket; lift the soft descriptor limit toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            log.warning("descriptor limit %d is below the %d this simulation needs", hard, need)


# -- running a whole simulation (CLI, benchmarks) --------------------------------------------

BURST_EVERY_S: Final = 5.0
BURST_LENGTH_S: Final = 2.0
BURST_SHARE: Final = 0.10
DRAIN_TIMEOUT_S: Final = 15.0


def _run_local(
    cfg: SimConfig,
    duration_s: float | None,
    loss_burst: bool,
    progress: Callable[[Progress], None] | None,
    progress_every: float,
    stop: threading.Event | EventT | None,
    barrier: BarrierT | None,
) -> SimReport:
    """Run one Simulator for duration_s (None: until stop is set) and report."""
    sim = Simulator(cfg)
    t0 = time.monotonic()
    sim.start()
    try:
        connect_s = time.monotonic() - t0
        if barrier is not None:
            barrier.wait(timeout=60.0 + 2.0 * cfg.devices / cfg.connect_rate)
        base = sim.stats()
        start = time.monotonic()
        rng = random.Random(cfg.seed)
        next_progress = start + progress_every
        next_burst = start + BURST_EVERY_S
        held: list[str] = []
        held_until = 0.0
        bursts = taken = 0
        while True:
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            if stop is not None and stop.is_set():
                break
            if loss_burst:
                if held and now >= held_until:
                    sim.bring_online(held)
                    held = []
                if not held and now >= next_burst:
                    online = [d.device_id for d in sim.stats().devices if d.online]
                    count = max(1, round(len(online) * BURST_SHARE)) if online else 0
                    held = rng.sample(online, count)
                    if held:
                        log.info("loss burst: taking %d devices offline", len(held))
                        sim.take_offline(held)
                        bursts += 1
                        taken += len(held)
                    held_until = now + BURST_LENGTH_S
                    next_burst = now + BURST_EVERY_S
            if progress is not None and now >= next_progress:
                next_progress = now + progress_every
                progress(_progress(sim.stats(), now - start))
            try:
                time.sleep(0.05)
            except KeyboardInterrupt:  # Ctrl-C ends the measurement; drain and report as usual
                log.info("interrupted: draining and stopping")
                break
        end = sim.stats()
        elapsed = max(time.monotonic() - start, 1e-9)
        if held:
            sim.bring_online(held)
        sim.pause()
        drained = sim.wait_drained(DRAIN_TIMEOUT_S)
        final = sim.stats()
    finally:
        sim.stop(graceful=True)
    return SimReport(
        devices=cfg.devices,
        procs=1,
        duration_s=round(elapsed, 3),
        connect_s=round(connect_s, 3),
        produced=final.produced,
        acked=final.acked,
        overflow=final.overflow,
        backlog=final.backlog,
        publish_rate=round((end.acked - base.acked) / elapsed, 1),
        produce_rate=round((end.produced - base.produced) / elapsed, 1),
        reconnects=final.connects - cfg.devices,
        offline_bursts=bursts,
        taken_offline=taken,
        drained=drained,
    )


def _progress(stats: SimStats, elapsed: float) -> Progress:
    return Progress(
        elapsed_s=round(elapsed, 1),
        produced=stats.produced,
        acked=stats.acked,
        backlog=stats.backlog,
        online=stats.online,
        devices=len(stats.devices),
    )


def _worker(
    k: int,
    cfg: SimConfig,
    duration_s: float | None,
    loss_burst: bool,
    progress_every: float,
    log_level: int,
    out: QueueT[tuple[str, int, Any]],
    barrier: BarrierT,
    stop: EventT,
) -> None:
    """One process of a multi-process run: simulate its share, send progress and the report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into `stop`
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[{k}]: %(message)s"
    )
    try:
        report = _run_local(
            cfg,
            duration_s,
            loss_burst,
            lambda p: out.put(("progress", k, p)),
            progress_every,
            stop,
            barrier,
        )
    except BaseException as exc:
        barrier.abort()  # the others must not wait for this process
        out.put(("error", k, f"{type(exc).__name__}: {exc}"))
        return
    out.put(("report", k, report))


def run_simulation(
    cfg: SimConfig,
    duration_s: float | None,
    procs: int = 1,
    loss_burst: bool = False,
    *,
    progress: Callable[[Progress], None] | None = None,
    progress_every: float = 2.0,
    stop: threading.Event | None = None,
) -> SimReport:
    """Connect cfg.devices devices, produce for duration_s seconds, drain, stop and report.

    procs > 1 splits the devices over that many processes (each with its own loop thread);
    they measure the same period (a barrier after connecting) and the report sums them.
    duration_s None runs until `stop` is set or Ctrl-C. loss_burst takes a random 10% of the
    devices offline ungracefully every few seconds, for a few seconds.
    """
    if procs < 1:
        raise ValueError(f"procs must be >= 1, got {procs}")
    procs = min(procs, cfg.devices)
    if procs == 1:
        return _run_local(cfg, duration_s, loss_burst, progress, progress_every, stop, None)
    return _run_procs(cfg, duration_s, procs, loss_burst, progress, progress_every, stop)


def _run_procs(
    cfg: SimConfig,
    duration_s: float | None,
    procs: int,
    loss_burst: bool,
    progress: Callable[[Progress], None] | None,
    progress_every: float,
    stop: threading.Event | None,
) -> SimReport:
    # spawn: the caller may have threads (tests, a coordinator), which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    out: QueueT[tuple[str, int, Any]] = ctx.Queue()
    barrier = ctx.Barrier(procs)
    stop_evt = ctx.Event()
    base, extra = divmod(cfg.devices, procs)
    workers = []
    first = cfg.first_index
    for k in range(procs):
        n = base + (1 if k < extra else 0)
        sub = replace(
            cfg,
            devices=n,
            first_index=first,
            connect_rate=cfg.connect_rate / procs,
            seed=None if cfg.seed is None else cfg.seed + k,
        )
        first += n
        p = ctx.Process(
            target=_worker,
            args=(
                k,
                sub,
                duration_s,
                loss_burst,
                progress_every,
                logging.getLogger().getEffectiveLevel(),
                out,
                barrier,
                stop_evt,
            ),
            name=f"simulate-{k}",
            daemon=True,
        )
        p.start()
        workers.append(p)
    reports: dict[int, SimReport] = {}
    errors: dict[int, str] = {}
    latest: dict[int, Progress] = {}
    last_emit = time.monotonic()
    try:
        while len(reports) + len(errors) < procs:
            try:
                if stop is not None and stop.is_set():
                    stop_evt.set()
                try:
                    what, k, body = out.get(timeout=0.5)
                except Exception:  # queue.Empty
                    if all(not p.is_alive() for p in workers):
                        break
                    continue
                if what == "report":
                    reports[k] = body
                elif what == "error":
                    errors[k] = body
                    stop_evt.set()
                else:
                    latest[k] = body
                    now = time.monotonic()
                    if (
                        progress is not None
                        and len(latest) == procs  # a partial sum would look like lost devices
                        and now - last_emit >= progress_every * 0.9
                    ):
                        last_emit = now
                        progress(_sum_progress(list(latest.values()), cfg.devices))
            except KeyboardInterrupt:
                stop_evt.set()  # workers drain and report; a second Ctrl-C is handled the same
    finally:
        for p in workers:
            p.join(timeout=30.0)
            if p.is_alive():
                p.terminate()
                p.join(5.0)
    if errors or len(reports) < procs:
        detail = "; ".join(f"process {k}: {e}" for k, e in sorted(errors.items()))
        raise RuntimeError(f"simulation failed: {detail or 'a worker process died'}")
    parts = list(reports.values())
    return SimReport(
        devices=sum(r.devices for r in parts),
        procs=procs,
        duration_s=max(r.duration_s for r in parts),
        connect_s=max(r.connect_s for r in parts),
        produced=sum(r.produced for r in parts),
        acked=sum(r.acked for r in parts),
        overflow=sum(r.overflow for r in parts),
        backlog=sum(r.backlog for r in parts),
        publish_rate=round(sum(r.publish_rate for r in parts), 1),
        produce_rate=round(sum(r.produce_rate for r in parts), 1),
        reconnects=sum(r.reconnects for r in parts),
        offline_bursts=sum(r.offline_bursts for r in parts),
        taken_offline=sum(r.taken_offline for r in parts),
        drained=all(r.drained for r in parts),
    )


def _sum_progress(parts: list[Progress], devices: int) -> Progress:
    return Progress(
        elapsed_s=max(p.elapsed_s for p in parts),
        produced=sum(p.produced for p in parts),
        acked=sum(p.acked for p in parts),
        backlog=sum(p.backlog for p in parts),
        online=sum(p.online for p in parts),
        devices=devices,
    )


__all__ = [
    "MAX_INFLIGHT",
    "DeviceStats",
    "Progress",
    "SimConfig",
    "SimReport",
    "SimStats",
    "Simulator",
    "device_id",
    "run_simulation",
]
