"""The demo's device: a real `edgefleet-agent` on the reference video, seen by a listener."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.protocol import TopicTree
from server.keystore import FleetKey
from server.listen import Listener
from server.localbroker import MosquittoBroker
from server.reference import VIDEO_PATH

Say = Callable[[str], None]


def agent_config(
    out: Path, device_id: str, bundle: Path, key: FleetKey, broker: MosquittoBroker
) -> Path:
    """A device's agent.toml: the reference video as its camera, 2 s telemetry windows."""
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


def run_device(
    out: Path,
    bundle: Path,
    key: FleetKey,
    say: Say,
    *,
    device_id: str = "demo-pi-1",
    seconds: float = 7.0,
) -> dict[str, Any]:
    """Start a broker, a listener and a real agent; stop the agent with SIGTERM; report counts."""
    out.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(out / "broker")
    broker.start()
    lines: list[str] = []

    def show(line: str) -> None:
        lines.append(line)
        say("      " + line)

    listener = Listener(broker.host, broker.port, TopicTree(), show)
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
    thread.start()
    try:
        listener.connected.wait(10)
        cfg = agent_config(out, device_id, bundle, key, broker)
        with (out / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            time.sleep(seconds)
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(30)
        time.sleep(1.0)  # the last window and the offline status are on their way
    finally:
        stop.set()
        thread.join(10)
        broker.stop()
    return {
        "agent_exit_code": code,
        "telemetry_windows": listener.counts.get("Telemetry", 0),
        "results": listener.counts.get("Result", 0),
        "events": listener.counts.get("Event", 0),
        "rejected": listener.counts.get("rejected", 0),
        "offline_seen": any(line.startswith(f"status {device_id} offline") for line in lines),
        "agent_log": str(out / "agent.log"),
    }
