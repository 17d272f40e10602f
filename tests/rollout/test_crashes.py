"""SIGKILL in the middle of an install: of an agent at each step, and of the coordinator.

A watcher on the broker kills the agent the moment it reports the step (in the MQTT callback,
not at the next poll), the test starts it again on the same config and state, and then
checks what the issue promises: the device runs a valid version (its status only ever names
v1's or v2's manifest, and state_dir/bundles/current verifies), the rollout still completes
(the engine sends the install again to a device that went quiet), and a download cut off
half way resumes from the chunks on disk.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.bundle import pack, verify_bundle
from edgefleet.agent.protocol import Event, InstallBundle, Status, Telemetry, TopicTree
from edgefleet.agent.protocol.codec import decode_topic
from edgefleet.agent.update.slots import Slots
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.fleet.store import IngestBatch, RolloutRecord, open_store
from edgefleet.server.fleet.store.base import EventIn
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.netutil import free_port
from edgefleet.server.rollout.archives import ArchiveStore
from edgefleet.server.rollout.engine import EngineSettings, RolloutEngine
from edgefleet.server.rollout.publisher import make_offer, publish
from edgefleet.server.rollout.spec import RolloutSpec
from tests.rollout.fleet import (
    TOKEN,
    LocalFleet,
    local_fleet,
    reference_version,
    restart_agent,
    send_command,
    start_coordinator_with,
    state_dir,
)
from tests.rollout.test_deploy import _finished, _manifest_sha, _upload
from tests.store.payloads import status

pytestmark = pytest.mark.timeout(150)


class Watcher:
    """Every event, status and telemetry window of the fleet; kills an agent on a trigger.

    trigger(message) is called in paho's thread for each decoded message until it returns a
    device id: that agent is SIGKILLed right there.
    """

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        self.tree = TopicTree(fleet.topic_root)
        self.lock = threading.Lock()
        self.messages: list[Event | Status | Telemetry] = []
        self.trigger: Callable[[Any], str | None] | None = None
        self.killed: tuple[str, Any] | None = None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(fleet.broker.host, fleet.broker.port)
        self.client.loop_start()
        self.client.subscribe(
            [(self.tree.all_devices(k), 1) for k in ("events", "status", "telemetry")]
        )
        assert ready.wait(10), "watcher could not subscribe"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, msg.topic, bytes(msg.payload))
        if not isinstance(decoded, (Event, Status, Telemetry)):
            return
        with self.lock:
            self.messages.append(decoded)
            trigger = self.trigger
        if trigger is not None and self.killed is None:
            device = trigger(decoded)
            if device is not None:
                self.fleet.agents[device].kill()
                self.killed = (device, decoded)

    def of(self, device_id: str, kind: type) -> list[Any]:
        with self.lock:
            return [m for m in self.messages if isinstance(m, kind) and m.device_id == device_id]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _install_state(m: Any) -> str | None:
    return m.details.get("install_state") if isinstance(m, Event) else None


def _check_valid(fleet: LocalFleet, watcher: Watcher, device: str, allowed: set[str]) -> None:
    """Everything the device ever reported running is v1 or v2; current verifies."""
    seen = {s.bundle_sha256 for s in watcher.of(device, Status) if s.online}
    assert seen <= allowed, (seen, allowed)
    current = state_dir(fleet, device) / "bundles" / "current"
    if current.exists():
        assert verify_bundle(current, [fleet.key.public]).manifest_sha256 in allowed


@pytest.fixture
def fleet2(tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str) -> Iterator[Any]:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        client = start_coordinator_with(fleet, rollout_resend_s=3)
        for i in range(2):
            fleet.start_agent(f"cam-{i}", v1)
        fleet.wait_online(client, 2)
        watcher = Watcher(fleet)
        try:
            yield fleet, client, v1, watcher
        finally:
            watcher.close()


@pytest.mark.parametrize("step", ["verifying", "health_checking", "on_trial", "installed"])
def test_an_agent_killed_at_an_install_step_ends_on_a_valid_version_and_the_rollout_completes(
    fleet2: Any, tmp_path: Path, step: str
) -> None:
    fleet, client, v1, watcher = fleet2
    v2 = reference_version(tmp_path / "v2", fleet.key, 2)
    old, new = _manifest_sha(v1, fleet), _manifest_sha(v2, fleet)
    installed: set[str] = set()

    def trigger(m: Any) -> str | None:
        state = _install_state(m)
        if state == "active":
            installed.add(m.device_id)
        if step == "on_trial":
            # Swapped (its status names v2) but not yet confirmed by frames (no `installed`).
            if isinstance(m, Status) and m.bundle_sha256 == new and m.device_id not in installed:
                return m.device_id
            return None
        want = "active" if step == "installed" else step
        return m.device_id if state == want else None

    watcher.trigger = trigger
    sha = _upload(client, v2, tmp_path)
    view = client.create_rollout(
        {"bundle_sha256": sha, "group": "lab", "canary": "1", "soak_s": 0, "waves": "100%"}
    )
    wait_until(lambda: watcher.killed is not None, 90, f"a device at {step}", detail=fleet.logs)
    assert watcher.killed is not None
    victim = watcher.killed[0]
    restart_agent(fleet, victim)
    done = _finished(client, view.rollout_id, fleet, 120)
    assert done.state == "completed", done
    assert done.counts == {"active": 2}, done
    wait_until(
        lambda: {d.bundle_sha256 for d in client.devices()} == {new}, 30, "both devices on v2"
    )
    for device in ("cam-0", "cam-1"):
        _check_valid(fleet, watcher, device, {old, new})
        current = state_dir(fleet, device) / "bundles" / "current"
        assert verify_bundle(current, [fleet.key.public]).manifest_sha256 == new
    # A version that survived its crash is confirmed once it ran, not left on trial for ever
    # (a device on trial rolls back after the next crashes: MAX_TRIAL_STARTS).
    slots = Slots(state_dir(fleet, victim) / "bundles")
    wait_until(lambda: slots.trial() is None, 30, f"{victim}'s trial confirmed")
    # Never failed, refused or rolled back on the way: the crash cost time, not the install.
    bad = [
        m
        for m in watcher.of(victim, Event)
        if _install_state(m) in ("failed", "refused", "rolled_back") or m.kind == "rollback"
    ]
    assert bad == [], bad


def test_a_download_killed_half_way_resumes_and_inference_never_stops(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    """Device level: the test publishes the archive itself, holding back its second half
    until the agent was killed mid-download, so the kill lands after some chunks for sure."""
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        fleet.start_agent("cam-0", v1)
        watcher = Watcher(fleet)
        try:
            old = _manifest_sha(v1, fleet)
            wait_until(
                lambda: any(s.bundle_sha256 == old for s in watcher.of("cam-0", Status)),
                60,
                "cam-0 on v1",
                detail=fleet.logs,
            )
            v2 = reference_version(tmp_path / "v2", fleet.key, 2)
            new = _manifest_sha(v2, fleet)
            archive = pack(v2, tmp_path / "v2.tar.gz")
            offer = make_offer(archive, model_id="mnist-cnn", version=2, manifest_sha256=new)
            total = offer.chunk_count
            assert total >= 8, total
            held = set(range(total // 2, total))
            publish(watcher.client, watcher.tree, archive, offer)
            for i in held:  # the second half is not on the broker yet
                pub = watcher.client.publish(
                    watcher.tree.bundle_chunk(offer.sha256, i), b"", qos=1, retain=True
                )
                pub.wait_for_publish(5)

            started: list[float] = []
            during: list[Telemetry] = []

            def mid_download(m: Any) -> str | None:
                """Killed after 3 telemetry windows run wholly inside the (stalled) download."""
                have = m.details.get("have") if isinstance(m, Event) else None
                if not started:
                    if _install_state(m) == "downloading" and isinstance(have, int) and have > 0:
                        started.append(m.ts)
                    return None
                if isinstance(m, Telemetry) and m.window_start >= started[0]:
                    during.append(m)
                return m.device_id if len(during) >= 3 else None

            watcher.trigger = mid_download
            cmd = InstallBundle(
                sha256=offer.sha256, model_id="mnist-cnn", version=2, manifest_sha256=new
            )
            send_command(watcher.client, fleet.topic_root, "cam-0", cmd)
            wait_until(lambda: watcher.killed is not None, 60, "cam-0 mid-download")
            parts = state_dir(fleet, "cam-0") / "transfers" / offer.sha256
            assert parts.is_dir(), "the partial download is on disk"
            # Now the whole archive is on the broker; the agent starts again and is told again.
            publish(watcher.client, watcher.tree, archive, offer)
            restart_agent(fleet, "cam-0")
            restarted = time.time()
            wait_until(
                lambda: any(
                    s.bundle_sha256 == old and s.ts >= restarted
                    for s in watcher.of("cam-0", Status)
                ),
                60,
                "cam-0 back on v1",
                detail=fleet.logs,
            )
            send_command(watcher.client, fleet.topic_root, "cam-0", cmd)
            box: dict[str, Event] = {}

            def installed() -> bool:
                for m in watcher.of("cam-0", Event):
                    if _install_state(m) in ("active", "failed", "refused"):
                        box["e"] = m
                        return True
                return False

            wait_until(installed, 90, "cam-0's install outcome", detail=fleet.logs)
            e = box["e"]
            assert _install_state(e) == "active", e
            received = e.details["chunks_received"]
            assert isinstance(received, int)
            # Resumed: what it had before the kill came from disk, not from the broker again.
            assert 0 < received < total, (received, total)
            print(f"resumed: {received} of {total} chunks fetched after the restart")
            _check_valid(fleet, watcher, "cam-0", {old, new})
            # Inference never stopped: frames in every window while the download ran (before
            # the kill), and in those of the second install after the restart.
            assert all(t.fps > 0 and t.frames_processed > 0 for t in during), during
            after = [
                t
                for t in watcher.of("cam-0", Telemetry)
                if t.window_start >= restarted and t.window_end <= e.ts
            ]
            assert all(t.fps > 0 and t.frames_processed > 0 for t in after), after
        finally:
            watcher.close()


def test_the_coordinator_killed_mid_rollout_picks_it_up_where_it_was(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    with local_fleet(tmp_path, mqtt_broker, topic_prefix) as fleet:
        v1 = reference_version(tmp_path, fleet.key, 1)
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        state = tmp_path / "coordinator"
        state.mkdir()
        port = free_port()
        cmd = [
            sys.executable, "-m", "edgefleet.server", "run",
            "--store", f"sqlite:///{state / 'fleet.db'}",
            "--broker", f"{mqtt_broker.host}:{mqtt_broker.port}",
            "--root", topic_prefix,
            "--http", f"127.0.0.1:{port}",
            "--token-file", str(token),
            "--fleet-key", str(fleet.key.public_path),
            "--state-dir", str(state),
        ]  # fmt: skip
        log = tmp_path / "coordinator.log"
        procs: list[subprocess.Popen[bytes]] = []

        def start() -> FleetClient:
            with log.open("ab") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
            api = FleetClient(f"http://127.0.0.1:{port}", TOKEN)

            def ready() -> bool:
                if "coordinator ready" not in log.read_text().split("--- start")[-1]:
                    return False
                try:
                    return api.devices() is not None
                except (ApiError, OSError):
                    return False

            wait_until(ready, 60, "the coordinator process", detail=log.read_text)
            return api

        try:
            client = start()
            for i in range(3):
                fleet.start_agent(f"cam-{i}", v1)
            fleet.wait_online(client, 3)
            sha = _upload(client, reference_version(tmp_path / "v2", fleet.key, 2), tmp_path)
            view = client.create_rollout(
                {"bundle_sha256": sha, "group": "lab", "canary": "1", "soak_s": 10,
                 "waves": "100%"}
            )  # fmt: skip
            rid = view.rollout_id
            wait_until(
                lambda: client.rollout(rid).phase == "soak", 90, "the soak", detail=fleet.logs
            )
            soaking = client.rollout(rid).devices or []
            before = {d.device_id: (d.wave, d.state, d.sent_at) for d in soaking}
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait(10)
            with log.open("a") as out:
                out.write("--- start after SIGKILL\n")
            client = start()
            seen = client.rollout(rid)
            # Where it was: still soaking (or just past it), the canary not sent anything again.
            assert seen.state == "running" and seen.phase in ("soak", "wave 1"), seen
            canary = next(d for d, (wave, _s, _t) in before.items() if wave == 0)
            again = next(d for d in seen.devices or [] if d.device_id == canary)
            assert before[canary][1] == again.state == "active", (before, again)
            assert again.sent_at == before[canary][2], (before, again)
            done = _finished(client, rid, fleet, 120)
            assert done.state == "completed", done
            assert done.counts == {"active": 3}, done
            new = _manifest_sha(tmp_path / "v2" / "bundle-v2", fleet)
            wait_until(
                lambda: {d.bundle_sha256 for d in client.devices()} == {new}, 30, "all on v2"
            )
            # Each device was asked once per wave it was in and never failed on the way.
            for d in done.devices or []:
                events = client.device(d.device_id, windows=0, events=200).events
                states = [
                    e.event.details.get("install_state")
                    for e in events
                    if e.event.details.get("rollout_id") == rid
                ]
                assert states.count("active") == 1, (d.device_id, states)
                assert not {"failed", "refused", "rolled_back"} & set(states), states
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()


class _Sent:
    """A Sender and Publisher that only records."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, Any]] = []

    def command(self, device_id: str, body: Any, expires_s: float) -> str:
        self.commands.append((device_id, body))
        return str(len(self.commands))

    def publish(self, info: Any) -> int:
        raise AssertionError("nothing is published in this test")

    def clear(self, info: Any) -> None:
        raise AssertionError("nothing is cleared in this test")

    def generation(self) -> int:
        return 0

    def present(self, info: Any) -> bool:
        return True


def test_a_device_gone_quiet_after_counted_chunks_is_sent_its_install_again(
    tmp_path: Path,
) -> None:
    """Engine level, on the real store: the device reported chunks (downloading 5/24), then
    verifying (an event without counts), then nothing (it was killed). After resend_s of
    silence it gets install_bundle again, and its row is not rewritten at every tick (a
    rewrite kept updated_at fresh, so the device never looked silent and was never resent)."""
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        now = time.time()
        store.ingest(
            IngestBatch(statuses=[status("cam-0", str(uuid.uuid4()), now, now, group="lab")])
        )
        spec = RolloutSpec(canary="1", soak_s=0, waves="100%")
        store.create_rollout(
            RolloutRecord(
                rollout_id="r-1", group="lab", bundle_sha256="a" * 64,
                manifest_sha256="b" * 64, model_id="digits-ee", version=4,
                spec_json=spec.model_dump_json(), state="running", phase="wave 0",
                phase_started_at=now, reason=None, created_at=now, updated_at=now,
            ),
            [["cam-0"]],
        )  # fmt: skip
        sent = _Sent()
        engine = RolloutEngine(
            store, ArchiveStore(tmp_path / "bundles", []), sent, sent,
            settings=EngineSettings(resend_s=1.0),
        )  # fmt: skip
        engine.tick()
        assert [(d, b.name) for d, b in sent.commands] == [("cam-0", "install_bundle")]

        def install_event(seq: int, state: str, **details: Any) -> EventIn:
            t = time.time()
            facts = {"install_state": state, "rollout_id": "r-1", "manifest_sha256": "b" * 64}
            ev = Event(
                device_id="cam-0", ts=t, seq=seq, kind="install_progress",
                message=state, details={**facts, **details},
            )  # fmt: skip
            return EventIn(received_at=t, event=ev)

        store.ingest(IngestBatch(events=[install_event(1, "downloading", have=5, total=24)]))
        engine.tick()
        store.ingest(IngestBatch(events=[install_event(2, "verifying")]))
        engine.tick()
        row = store.rollout_devices("r-1")[0]
        assert (row.state, row.have) == ("verifying", 5), row
        engine.tick()
        assert store.rollout_devices("r-1")[0].updated_at == row.updated_at
        wait_until(
            lambda: (engine.tick(), len(sent.commands) >= 2)[1], 10, "install_bundle sent again"
        )
        assert sent.commands[1][1].name == "install_bundle"
    finally:
        store.close()
