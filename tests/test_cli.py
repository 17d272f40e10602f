"""The console scripts: keys, bundle verify, agent verify, server listen as real processes;
--version and --help of all three."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet import __version__
from edgefleet.agent import __main__ as agent_main
from edgefleet.agent.bundle import load_private_key, write_bundle
from edgefleet.agent.helpformat import has_default, walk
from edgefleet.agent.protocol import TopicTree, encode
from edgefleet.server import __main__ as server_main
from edgefleet.server.cli import app as cli_app
from edgefleet.server.local.broker import MosquittoBroker
from tests.bundle_helpers import two_stage_body, two_stage_files
from tests.protocol_samples import telemetry as sample_telemetry


def _run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_HOME": str(home)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_keys_init_show_and_bundle_verify(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _run("-m", "edgefleet.server.cli", "keys", "init", home=home)
    assert first.returncode == 0, first.stderr
    assert "(created)" in first.stdout
    private = home / "keys" / "fleet.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = _run("-m", "edgefleet.server.cli", "keys", "init", home=home)
    assert "(exists)" in again.stdout
    show = _run("-m", "edgefleet.server.cli", "keys", "show", home=home)
    assert "-----BEGIN PUBLIC KEY-----" in show.stdout

    bundle = tmp_path / "bundle"
    write_bundle(bundle, two_stage_body(), two_stage_files(), load_private_key(private))
    ok = _run("-m", "edgefleet.server.cli", "bundle", "verify", str(bundle), home=home)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK tiny-cnn v3: signed by")
    assert "operating point 1 fast" in ok.stdout

    agent_ok = _run(
        "-m", "edgefleet.agent", "verify", str(bundle), "--key", str(home / "keys" / "fleet.pub"),
        home=home,
    )
    assert agent_ok.returncode == 0, agent_ok.stderr

    (bundle / "stage1.onnx").write_bytes(b"tampered")
    bad = _run("-m", "edgefleet.server.cli", "bundle", "verify", str(bundle), home=home)
    assert bad.returncode == 1
    assert "stage1.onnx: sha256" in bad.stderr and "Traceback" not in bad.stderr
    agent_bad = _run(
        "-m", "edgefleet.agent", "verify", str(bundle), "--key", str(home / "keys" / "fleet.pub"),
        home=home,
    )
    assert agent_bad.returncode == 1 and "stage1.onnx" in agent_bad.stderr


def test_keys_show_without_key_says_how_to_create(tmp_path: Path) -> None:
    res = _run("-m", "edgefleet.server.cli", "keys", "show", home=tmp_path)
    assert res.returncode == 1
    assert "run `edgefleet keys init` first" in res.stderr


def test_server_listen_decodes_and_counts_rejects(
    mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    root = f"{topic_prefix}/edgefleet/v1"
    tree = TopicTree(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.server", "listen",
         "--port", str(mqtt_broker.port), "--root", root],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err_lines: queue.Queue[str] = queue.Queue()
    out_lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None and proc.stdout is not None
    readers = [
        threading.Thread(target=lambda s=stream, q=q: [q.put(ln) for ln in s], daemon=True)
        for stream, q in ((proc.stderr, err_lines), (proc.stdout, out_lines))
    ]
    for reader in readers:
        reader.start()
    seen: list[str] = []
    printed: list[str] = []
    try:
        while not any("listening under" in ln for ln in seen):
            seen.append(err_lines.get(timeout=20))
        telemetry = sample_telemetry()
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(mqtt_broker.host, mqtt_broker.port)
        pub.loop_start()
        pub.publish(
            tree.device(telemetry.device_id, "telemetry"), b"{garbage", qos=1
        ).wait_for_publish(5)
        pub.publish(
            tree.device(telemetry.device_id, "telemetry"), encode(telemetry), qos=1
        ).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        while not any("rejected" in ln for ln in seen):
            seen.append(err_lines.get(timeout=20))
        want = f"telemetry {telemetry.device_id} seq={telemetry.seq}"
        while not any(want in ln for ln in printed):
            printed.append(out_lines.get(timeout=20))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        for reader in readers:
            reader.join(timeout=10)  # each stream is read to EOF by its reader alone
    while not err_lines.empty():
        seen.append(err_lines.get())
    while not out_lines.empty():
        printed.append(out_lines.get())
    err, out = "".join(seen), "".join(printed)
    assert proc.returncode == 0, err
    assert f"telemetry {telemetry.device_id} seq={telemetry.seq}" in out
    assert "rejected" in err and "payload is not JSON" in err
    assert "'Telemetry': 1" in err and "'rejected': 1" in err


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser and subcommand parser of the three console scripts."""
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for build in (agent_main.build_parser, server_main.build_parser, cli_app.build_parser):
        found += walk(build())
    return found


def test_every_console_script_says_its_version(tmp_path: Path) -> None:
    for module, prog in (
        ("edgefleet.server.cli", "edgefleet"),
        ("edgefleet.server", "edgefleet-server"),
        ("edgefleet.agent", "edgefleet-agent"),
    ):
        res = _run("-m", module, "--version", home=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"{prog} {__version__}"


def test_every_option_has_help_and_shows_its_default() -> None:
    progs = {prog for prog, _ in _parsers()}
    assert {"edgefleet fleet cmd", "edgefleet-agent bench", "edgefleet-server run"} <= progs
    for prog, parser in _parsers():
        parser.format_help()  # every help string formats (a stray % would raise here)
        formatter = parser.formatter_class(prog)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{prog} {choice.dest}: no help"
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{prog} {name}: no help text"
            if has_default(action):
                shown = formatter._expand_help(action)  # the text --help prints
                assert "(default" in shown, f"{prog} {name}: default {action.default!r} not shown"


def test_subcommand_help_shows_defaults_as_a_newcomer_reads_them(tmp_path: Path) -> None:
    res = _run("-m", "edgefleet.agent", "bench", "--help", home=tmp_path)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "(default: 200)" in text and "(default: 3)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
