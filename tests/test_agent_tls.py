"""The agent over mutual TLS to a real mosquitto; without its client certificate it is refused."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.protocol import TopicTree
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker, TlsListener
from edgefleet.server.local.waiting import wait_until
from tests.agent_harness import Collector, queued, reference_bundle
from tests.harness.certs import issue, make_ca


def _tls_config(path: Path, broker: MosquittoBroker, tls_block: str) -> None:
    text = path.read_text().replace(f"port = {broker.port}", f"port = {broker.tls_port}")
    path.write_text(text + tls_block)


def test_agent_reports_over_mutual_tls_and_is_refused_without_a_client_cert(
    tmp_path: Path, topic_prefix: str
) -> None:
    ca, ca_key, ca_cert = make_ca(tmp_path / "pki")
    server = issue(tmp_path / "pki", "broker", ca_key, ca_cert, server=True)
    device = issue(tmp_path / "pki", "pi-tls", ca_key, ca_cert, server=False)
    broker = MosquittoBroker(tmp_path / "mq", tls=TlsListener(ca.cert, server.cert, server.key))
    broker.start()
    root = f"{topic_prefix}/edgefleet/v1"
    col = Collector(broker, TopicTree(root))  # the coordinator side, on the plain listener
    try:
        bundle, key = reference_bundle(tmp_path / "a")
        cfg = write_config(
            tmp_path / "a",
            device_id="pi-tls",
            broker=broker,
            topic_root=root,
            bundle=bundle,
            key=key,
        )
        _tls_config(
            cfg,
            broker,
            f'[mqtt.tls]\nca = "{ca.cert}"\ncert = "{device.cert}"\nkey = "{device.key}"\n',
        )
        agent = AgentProcess(cfg, tmp_path / "a.log")
        try:
            assert col.wait(lambda c: len(c.telemetry) >= 2, 60), agent.output()[-3000:]
            assert col.status and col.status[0].online
        finally:
            agent.terminate()

        # Same agent, CA only, no client certificate: the broker refuses; inference goes on.
        bundle2, key2 = reference_bundle(tmp_path / "b")
        cfg2 = write_config(
            tmp_path / "b",
            device_id="pi-nocert",
            broker=broker,
            topic_root=root,
            bundle=bundle2,
            key=key2,
        )
        _tls_config(cfg2, broker, f'[mqtt.tls]\nca = "{ca.cert}"\n')
        agent = AgentProcess(cfg2, tmp_path / "b.log")
        try:
            # Windows pile up in its outbox: it keeps inferring, and nothing drains them (an
            # accepted agent's outbox empties within moments of each window).
            wait_until(
                lambda: queued(tmp_path / "b" / "state", "telemetry") >= 3,
                60,
                "3 undelivered telemetry windows in the outbox",
                detail=agent.tail,
            )
            assert agent.alive(), agent.tail()
            assert not [t for t in col.telemetry if t.device_id == "pi-nocert"]
        finally:
            agent.terminate()
    finally:
        col.close()
        broker.stop()


def test_unusable_tls_files_end_the_agent_with_the_key_named(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    """A missing CA and a CA that is not a certificate: exit 2 (no restart), one clear line."""
    import subprocess
    import sys

    bundle, key = reference_bundle(tmp_path)
    cfg = write_config(
        tmp_path, device_id="pi-badtls", broker=mqtt_broker,
        topic_root=f"{topic_prefix}/edgefleet/v1", bundle=bundle, key=key,
    )  # fmt: skip
    plain = cfg.read_text()
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("hello\n")
    cases = [
        (f'[mqtt.tls]\nca = "{tmp_path / "missing.pem"}"\n', "mqtt.tls.ca "),
        (f'[mqtt.tls]\nca = "{not_a_cert}"\n', f"mqtt.tls ({not_a_cert}): not usable"),
    ]
    for block, expected in cases:
        cfg.write_text(plain + block)
        run = subprocess.run(
            [sys.executable, "-m", "edgefleet.agent", "run", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert "refusing to run: " + expected in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        check = subprocess.run(
            [sys.executable, "-m", "edgefleet.agent", "check", "--config", str(cfg)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert f"FAIL broker: {expected}" in check.stdout, check.stdout + check.stderr
