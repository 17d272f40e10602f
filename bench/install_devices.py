"""Install-only simulated devices: the real link, update manager and slots, no camera.

Each device is a real `Link` (its own client id, its outbox in its own state dir), a real
`UpdateManager` over real `Slots`, and a `CommandHandler` answering the coordinator's
commands. One shared loop thread plays the inference loop's part for all of them: it hands
commands over, takes a checked model when the manager offers one (`take_swap` / `swapped`)
and counts frames (`frame_done`) so the trial is confirmed as on an agent. Download, staging,
signature checks and the health check (onnxruntime sessions, 1 thread) are the device's own
code, so many of these load the coordinator and the broker as many agents would.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from edgefleet.agent import __version__
from edgefleet.agent.bundle import VerifiedBundle, verify_bundle
from edgefleet.agent.commands import CommandHandler
from edgefleet.agent.config import ModelConfig, MqttConfig, UpdateConfig
from edgefleet.agent.hardware import describe
from edgefleet.agent.link import Link
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.protocol import Event, InstallBundle, RollbackBundle, Status, encode
from edgefleet.agent.update.manager import Running, UpdateManager, previous_manifest_sha256
from edgefleet.agent.update.slots import Slots
from edgefleet.server.keystore import FleetKey

LOOP_S = 0.01  # the shared loop's period: a simulated "frame" every 10 ms


class InstallDevice:
    """One simulated device; also the target of its commands (install and rollback only)."""

    def __init__(
        self,
        root: Path,
        device_id: str,
        group: str,
        mqtt: MqttConfig,
        bundle: Path,
        key: FleetKey,
        update: UpdateConfig,
    ) -> None:
        self.device_id = device_id
        self.group = group
        self.state_dir = root / device_id
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.boot_id = str(uuid.uuid4())
        self.hardware = describe()
        self.verified: VerifiedBundle = verify_bundle(bundle, [key.public])
        self.slots = Slots(self.state_dir / "bundles")
        self.outbox = Outbox(self.state_dir / "outbox.db")
        self.link = Link(device_id, group, mqtt, self.outbox, self.birth, self.event)
        self.commands = CommandHandler(device_id, self)
        self.updates = UpdateManager(
            device_id=device_id,
            slots=self.slots,
            transfers_dir=self.state_dir / "transfers",
            cfg=update,
            model_cfg=ModelConfig(bundle=bundle, trusted_keys=[key.public_path], threads=1),
            link=self.link,
            tree=self.link.tree,
            keys=[key.public],
            device_class="bench-sim",
            event=self.event,
            running=self._running,
        )
        self.link.on_transfer = self.updates.on_transfer
        self.swap_ms: list[float] = []

    def birth(self) -> Status:
        """The retained status: names the running bundle, so the registry sees a device."""
        m = self.verified.manifest
        return Status(
            device_id=self.device_id,
            online=True,
            ts=time.time(),
            agent_version=__version__,
            model_id=m.model_id,
            model_version=m.version,
            group=self.group,
            hardware=self.hardware,
            boot_id=self.boot_id,
            bundle_sha256=self.verified.manifest_sha256,
            previous_bundle_sha256=previous_manifest_sha256(self.slots),
        )

    def event(self, kind: str, message: str, details: dict[str, Any] | None = None) -> None:
        """Queue an event through the outbox, as the agent does."""
        ev = Event(
            device_id=self.device_id,
            ts=time.time(),
            seq=self.outbox.next_seq("events"),
            kind=kind,
            level="error" if kind in ("error", "rollback") else "info",
            message=message[:1000],
            details={
                k: v
                for k, v in (details or {}).items()
                if isinstance(v, (str, int, float, bool)) or v is None
            },
        )
        self.link.send("events", encode(ev))

    def _running(self) -> Running:
        m, v = self.verified.manifest, self.verified
        return Running(m.model_id, m.version, v.manifest_sha256, tuple(m.input.shape), v.path)

    # -- command target: only what a rollout sends ------------------------------------------

    def install_bundle(self, cmd: InstallBundle) -> dict[str, JsonValue]:
        return self.updates.install(cmd)

    def rollback_bundle(self, cmd: RollbackBundle) -> dict[str, JsonValue]:
        return self.updates.rollback(cmd)

    def __getattr__(self, name: str) -> Any:
        # Any other command (operating points, snapshots...) is answered ok=false.
        def unsupported(*_a: object, **_k: object) -> dict[str, JsonValue]:
            raise ValueError(f"{name}: not supported by a simulated install-only device")

        return unsupported

    # -- the loop's part ----------------------------------------------------------------------

    def step(self) -> None:
        """One pass of the inference loop without inference: commands, swap, a frame."""
        while True:
            try:
                topic, payload, retained = self.link.commands.get_nowait()
            except Exception:  # queue.Empty
                break
            if retained:
                continue
            _reply, data = self.commands.answer(topic, payload)
            self.link.send("reply", data)
        swap = self.updates.take_swap()
        if swap is not None:
            t0 = time.perf_counter()
            self.verified = swap.verified  # the "model" switch: what the birth names
            ms = (time.perf_counter() - t0) * 1e3
            self.swap_ms.append(ms)
            self.link.republish_birth()
            self.updates.swapped(swap, ms)
        self.updates.frame_done()

    def running_sha256(self) -> str:
        """Manifest sha256 of the bundle this device runs."""
        return self.verified.manifest_sha256


class InstallFleet:
    """n simulated devices in this process, one loop thread for all of them."""

    def __init__(self, devices: list[InstallDevice]) -> None:
        self.devices = devices
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sim-loop", daemon=True)

    def start(self) -> None:
        """Connect every link, then run the loop."""
        for d in self.devices:
            d.link.start()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for d in self.devices:
                d.step()
            time.sleep(LOOP_S)

    def connected(self) -> int:
        """How many links are connected."""
        return sum(d.link.connected.is_set() for d in self.devices)

    def stop(self) -> None:
        """Stop the loop, abandon jobs, disconnect."""
        self._stop.set()
        self._thread.join(5)
        for d in self.devices:
            d.updates.stop()
            d.link.stop(1.0)
