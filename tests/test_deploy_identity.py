"""The installer with a provisioned broker identity, against the shipped (secure) broker profile.

The flow of docs/security.md: `edgefleet fleet provision ID --out FILE` on the broker's host,
then `install-agent.sh --mqtt-password-file FILE --broker-ca ca.pem` on the device, then
`edgefleet-agent check` of what was installed, answered by a real mosquitto.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.config import load_config
from edgefleet.server.cli import app as cli_app
from edgefleet.server.identity import IdentityDir
from edgefleet.server.local.broker import MosquittoBroker
from tests.test_deploy import VENV_PATH, install_args, make_keys, run_install, snapshot

DEVICE_CA = Path("/etc/edgefleet/broker-ca.pem")  # the device's path, written in agent.toml


@dataclass
class Secure:
    base: Path
    root: Path
    key: Path
    source: Path
    ids: IdentityDir
    broker: MosquittoBroker
    secret: Path
    first: subprocess.CompletedProcess[str]

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "edgefleet"

    def provision(self, *extra: str) -> None:
        """`edgefleet fleet provision pi-7 --out SECRET` on the broker's host, then reload it."""
        d = ["--dir", str(self.ids.directory), "--pid-file", str(self.broker.pid_file)]
        self.secret.unlink(missing_ok=True)
        args = ["fleet", "provision", "pi-7", "--group", "lab", "--out", str(self.secret)]
        assert cli_app.main([*args, *extra, *d]) == 0

    def install(self, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        # No port: the installer's TLS default (8883), which the check below overrides.
        args = install_args(self.root, self.key, self.source, broker="127.0.0.1")
        return run_install(*args, *extra)

    def check(self, credentials: Path) -> str:
        """`edgefleet-agent check` of the installed tree; its output.

        Two things differ from the device: the broker's port (the test broker's, not 8883) and
        the CA's path (under the --root tree, not /etc); both through the agent's own
        EDGEFLEET_ overrides. The password comes as systemd would hand it over.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update(
            CREDENTIALS_DIRECTORY=str(credentials),
            EDGEFLEET_MQTT__PORT=str(self.broker.tls_port),
            EDGEFLEET_MQTT__TLS__CA=str(self.etc / "broker-ca.pem"),
        )
        agent = self.root / VENV_PATH / "bin" / "edgefleet-agent"
        # Exit 1 here: no bundle and no camera in this tree; only the broker line matters.
        res = subprocess.run(
            [agent, "check", "--config", self.etc / "agent.toml"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        return res.stdout + res.stderr


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    base = tmp_path_factory.mktemp("deploy-identity")
    ids = IdentityDir(base / "identity")
    broker = MosquittoBroker(base / "broker", identity=ids)  # CA and server cert for 127.0.0.1
    key, _ = make_keys(base)
    s = Secure(base, base / "root", key, snapshot(base), ids, broker, base / "pi-7.secret",
               subprocess.CompletedProcess([], 0))  # fmt: skip
    s.provision()
    broker.start()
    try:
        # World-readable input is fine: it is the installed copy that must be root-only.
        s.secret.chmod(0o644)
        s.first = s.install("--mqtt-password-file", s.secret, "--broker-ca", ids.ca)
        assert s.first.returncode == 0, s.first.stderr
        yield s
    finally:
        broker.stop()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credential_and_ca_land_root_only_and_the_config_uses_them(secure: Secure) -> None:
    etc, password = secure.etc, secure.secret.read_text().strip()
    cred = etc / "credentials" / "mqtt-password"
    assert cred.read_bytes() == secure.secret.read_bytes()
    assert _mode(cred) == 0o600 and _mode(cred.parent) == 0o700
    ca = etc / "broker-ca.pem"
    assert ca.read_bytes() == secure.ids.ca.read_bytes() and _mode(ca) == 0o644

    text = (etc / "agent.toml").read_text()
    assert password not in text
    config = load_config(etc / "agent.toml", env={})
    assert config.mqtt.username == "pi-7"  # the device id, as provisioning names it
    assert config.mqtt.port == 8883  # a CA and no port: MQTT over TLS
    assert config.mqtt.tls is not None and config.mqtt.tls.ca == DEVICE_CA
    assert config.mqtt.password is None  # only ever from the credential
    # What systemd hands over completes it.
    handed = load_config(etc / "agent.toml", env={"CREDENTIALS_DIRECTORY": str(cred.parent)})
    assert handed.mqtt.password == password

    log = secure.first.stdout + secure.first.stderr
    assert password not in log
    assert "installed" in log and "broker-ca.pem" in log
    assert "anonymous" not in log and "unencrypted" not in log


def test_installed_agent_is_accepted_by_the_secure_broker(secure: Secure, tmp_path: Path) -> None:
    out = secure.check(secure.etc / "credentials")
    port = secure.broker.tls_port
    assert f"ok   broker 127.0.0.1:{port} accepted the connection" in out, out

    # The same tree with a password the broker does not know, or none: refused.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "mqtt-password").write_text("not-the-provisioned-one\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for creds in (wrong, empty):
        out = secure.check(creds)
        assert "FAIL broker: refused" in out, out


def test_rotation_replaces_the_credential_only_when_given(secure: Secure) -> None:
    cred = secure.etc / "credentials" / "mqtt-password"
    ca = secure.etc / "broker-ca.pem"
    old = cred.read_bytes()
    secure.provision("--rotate")  # the broker now knows only the new password
    assert secure.secret.read_bytes() != old

    # broker.pem instead of ca.pem: parsed by the installed package, refused before anything
    # is written (the grep-level check only knows it is a certificate).
    refused = secure.install("--mqtt-password-file", secure.secret, "--broker-ca", secure.ids.cert)
    assert refused.returncode == 2, refused.stderr
    assert "--broker-ca" in refused.stderr and "not a CA certificate" in refused.stderr
    assert cred.read_bytes() == old and ca.read_bytes() == secure.ids.ca.read_bytes()

    again = secure.install("--mqtt-password-file", secure.secret, "--broker-ca", secure.ids.ca)
    assert again.returncode == 0, again.stderr
    assert "replaced" in again.stderr and "kept" in again.stderr  # the password; agent.toml
    assert "does not use the broker identity" not in again.stderr
    assert cred.read_bytes() == secure.secret.read_bytes() and _mode(cred) == 0o600
    assert secure.secret.read_text().strip() not in again.stdout + again.stderr
    out = secure.check(secure.etc / "credentials")
    assert f"ok   broker 127.0.0.1:{secure.broker.tls_port} accepted" in out, out


def test_bad_identity_inputs_are_refused_naming_the_option(tmp_path: Path) -> None:
    pub, private = make_keys(tmp_path)
    root = tmp_path / "root"
    base: list[str | Path] = ["--root", root, "--device-id", "pi-7", "--broker", "localhost"]
    base += ["--fleet-key", pub]
    marker = "do-not-print-me-4711"

    def write(name: str, text: str, mode: int = 0o644) -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(mode)
        return path

    ids = IdentityDir(tmp_path / "identity")
    ids.init(hosts=["localhost"])
    good_ca = ids.ca
    cases: list[tuple[list[str | Path], str]] = [
        (["--mqtt-password-file", write("empty", "")], "is empty"),
        (["--mqtt-password-file", write("blank", " \n\t\n")], "is empty"),
        (["--mqtt-password-file", tmp_path / "absent"], "not found"),
        (["--mqtt-password-file", tmp_path], "is not a regular file"),
        (["--mqtt-password-file", write("two", f"{marker}\n{marker}\n")], "more than one line"),
        (["--broker-ca", write("text", f"{marker}\n")], "is not a PEM certificate"),
        (["--broker-ca", private], "PRIVATE key"),
        (["--broker-ca", ids.ca_key], "PRIVATE key"),
        (["--broker-ca", pub], "is not a PEM certificate"),  # a PEM, but a public key
        (["--broker-ca", tmp_path / "absent.pem"], "not found"),
        (["--mqtt-username", "pi/7", "--broker-ca", good_ca], "is not a valid name"),
    ]
    if os.geteuid() != 0:  # root reads any file
        unreadable = write("unreadable", f"{marker}\n", mode=0o000)
        cases.append((["--mqtt-password-file", unreadable], "is not readable"))
    for args, message in cases:
        res = run_install(*base, *args)
        option = str(args[0])
        out = res.stdout + res.stderr
        assert res.returncode == 2, (args, out)
        assert option in res.stderr and message in res.stderr, (args, out)
        assert marker not in out, (args, out)
    assert not root.exists(), "nothing is installed before the arguments are checked"
