"""The demo's local fleet: a broker, a coordinator, real agents on the reference video, and a
crowd of simulated devices; the operator's view printed as `edgefleet fleet ls` shows it."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.agent.protocol import Ping
from edgefleet.server.cli.fleet import device_rows, table
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.fleet.commander import Commander
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.keystore import FleetKey
from edgefleet.server.localbroker import MosquittoBroker
from edgefleet.server.reference import VIDEO_PATH

Say = Callable[[str], None]


def agent_config(
    out: Path, device_id: str, bundle: Path, key: FleetKey, broker: MosquittoBroker
) -> Path:
    """A device's agent.toml: the reference video as its camera, 2 s telemetry windows."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "agent.toml"
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'state_dir = "{out / "state"}"\n'
        f'[camera]\nsource = "{VIDEO_PATH}"\nloop = true\nfps = 30\n'
        f'[model]\nbundle = "{bundle}"\ntrusted_keys = ["{key.public_path}"]\nthreads = 1\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        "[telemetry]\ninterval_s = 2\n"
    )
    return path


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def run_device(
    out: Path,
    bundle: Path,
    key: FleetKey,
    say: Say,
    *,
    agents: int = 2,
    simulated: int = 48,
    seconds: float = 8.0,
) -> dict[str, Any]:
    """Run the local fleet for a few seconds, show the operator's view, stop it cleanly."""
    out.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(out / "broker")
    broker.start()
    token = secrets.token_hex(16)
    coordinator = Coordinator(
        CoordinatorConfig(
            store=f"sqlite:///{out / 'coordinator.db'}",
            mqtt=IngestConfig(host=broker.host, port=broker.port, client_id="demo-coordinator"),
            http_port=0,
            token=token,
        )
    )
    coordinator.start()
    coordinator.ingestor.wait_connected(10)
    say(f"      broker 127.0.0.1:{broker.port}, coordinator API {coordinator.url}")
    sim = Simulator(
        SimConfig(host=broker.host, port=broker.port, devices=simulated, rate=0.5,
                  prefix="sim-cam", group="simulated")
    )
    procs: list[subprocess.Popen[bytes]] = []
    ids = [f"demo-pi-{i + 1}" for i in range(agents)]
    codes: list[int] = []
    try:
        for device_id in ids:
            cfg = agent_config(out / device_id, device_id, bundle, key, broker)
            with (out / f"{device_id}.log").open("wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "edgefleet.agent", "run", "--config", str(cfg)],
                    stdout=log, stderr=subprocess.STDOUT,
                ))
        sim.start()
        say(f"      {agents} real agents (INT8 bundle, reference video) and {simulated} "
            "simulated devices report to it")
        store = coordinator.store
        _wait(lambda: all(
            (d := store.device(i)) is not None and d.last_telemetry is not None for i in ids
        ), 60)
        time.sleep(seconds)
        client = FleetClient(coordinator.url, token)
        fleet = client.devices()
        shown = [d for d in fleet if d.device_id in ids] + [
            d for d in fleet if d.device_id not in ids
        ][:4]
        say(f"      $ edgefleet fleet ls   (first {len(shown)} of {len(fleet)})")
        for line in table(device_rows(shown)).splitlines():
            say("      " + line)
        pings = Commander(coordinator.ingestor).send(Ping(), device=ids[0], timeout_s=10)
        say(f"      $ edgefleet fleet cmd {ids[0]} ping -> "
            f"{'ok' if pings.replies and pings.replies[0].ok else 'no reply'}")

        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(30) for p in procs]
        sim.pause()
        sim.wait_drained(30)
        produced = {d.device_id: d.next_seq for d in sim.stats().devices}
        _wait(lambda: all(not (d := store.device(i)) or not d.online for i in ids), 15)
        _wait(lambda: store.telemetry_count() >= sum(produced.values()), 15)
        reports = store.sequence_reports()
        offline = [i for i in ids if (d := store.device(i)) is not None and not d.online]
        result = {
            "agent_exit_codes": codes,
            "devices": len(fleet),
            "online_at_view": sum(d.online for d in fleet),
            "agents_reporting": sum(
                1 for d in fleet if d.device_id in ids and d.fps is not None and d.fps > 0
            ),
            "telemetry_windows": store.telemetry_count(),
            "missing": sum(r.missing for r in reports),
            "rejected": sum(store.reject_counts().values()),
            "ping_ok": bool(pings.replies and pings.replies[0].ok),
            "agents_offline_after_stop": offline,
            "events": len(store.events(limit=1000)),
        }
        say(f"      stopped: {result['telemetry_windows']} telemetry windows stored, "
            f"{result['missing']} missing, {result['rejected']} rejected; "
            f"agents offline: {', '.join(offline) or 'none'}")
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        sim.stop()
        coordinator.stop()
        broker.stop()
