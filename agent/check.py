"""`edgefleet-agent check`: config, keys, bundle, camera and broker, each said plainly."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.camera import Camera
from edgefleet.agent.config import DEFAULT_CREDENTIALS_DIR, AgentConfig, ConfigError, load_config
from edgefleet.agent.link import TlsSetupError, apply_tls
from edgefleet.agent.service import AgentError, load_model

Say = Callable[[str], None]


def _broker(cfg: AgentConfig, timeout: float) -> str | None:
    """None when the broker acknowledges a connection, else why not."""
    acked = threading.Event()
    result: list[str] = []

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            result.append(f"refused: {rc}")
        acked.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        protocol=mqtt.MQTTv5,
        client_id=f"edgefleet-check-{cfg.device_id}",
    )
    if cfg.mqtt.username:
        client.username_pw_set(cfg.mqtt.username, cfg.mqtt.password)
    if cfg.mqtt.tls is not None:
        try:
            apply_tls(client, cfg.mqtt.tls)
        except TlsSetupError as exc:
            return str(exc)
    client.on_connect = on_connect
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=10)
    except OSError as exc:
        return f"cannot connect to {cfg.mqtt.host}:{cfg.mqtt.port}: {exc}"
    client.loop_start()
    try:
        if not acked.wait(timeout):
            return f"{cfg.mqtt.host}:{cfg.mqtt.port}: no CONNACK within {timeout:.0f} s"
        return result[0] if result else None
    finally:
        client.disconnect()
        client.loop_stop()


def check(path: Path, say: Say = print, timeout: float = 5.0) -> int:
    """Run every check, report each; 0 when all pass."""
    # Outside systemd there is no $CREDENTIALS_DIRECTORY: read the file the unit would hand
    # over, so a broker that needs the password does not fail here for the wrong reason.
    env = dict(os.environ)
    if "CREDENTIALS_DIRECTORY" not in env and os.access(DEFAULT_CREDENTIALS_DIR, os.R_OK):
        env["CREDENTIALS_DIRECTORY"] = str(DEFAULT_CREDENTIALS_DIR)
    try:
        cfg = load_config(path, env)
    except ConfigError as exc:
        say(f"FAIL config: {exc}")
        return 1
    say(f"ok   config {path}: device {cfg.device_id}")
    failures = 0
    try:
        model = load_model(cfg)
        m = model.manifest
        say(f"ok   bundle {m.model_id} v{m.version}: signature and hashes verified, sessions built")
    except AgentError as exc:
        say(f"FAIL bundle: {exc}")
        failures += 1
    reasons: list[str] = []
    camera = Camera(cfg.camera, on_event=lambda _kind, message, _details: reasons.append(message))
    camera.start()
    frame = camera.latest(timeout=timeout)
    camera.stop()
    if frame is None:
        why = f" ({reasons[0]})" if reasons else ""
        say(f"FAIL camera {camera.name}: no frame within {timeout:.0f} s{why}")
        failures += 1
    else:
        say(f"ok   camera {camera.name}: {frame.image.shape[1]}x{frame.image.shape[0]} frames")
    problem = _broker(cfg, timeout)
    if problem:
        say(f"FAIL broker: {problem}")
        failures += 1
    else:
        say(f"ok   broker {cfg.mqtt.host}:{cfg.mqtt.port} accepted the connection")
    return 0 if failures == 0 else 1
