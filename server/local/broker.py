"""A private mosquitto: own config, own port, persistence dir; stoppable and restartable.

The broker of every local fleet: the demo's, the benchmarks' and the tests' (one per test).
Two profiles: anonymous (one plain listener, for tests that are not about identity) and secure
(`identity=`: the shipped configuration of deploy/mosquitto, rendered with this broker's ports
and identity directory: TLS, a password per client, the ACL, no anonymous access).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgefleet.server.identity import BrokerConf, IdentityDir, render_conf
from edgefleet.server.netutil import free_port, wait_closed, wait_listening

INSTALL_HINT = (
    "mosquitto is not installed: edgefleet needs a real MQTT broker. "
    "Install it with `sudo apt-get install -y mosquitto` "
    "or run `bash deploy/quickstart.sh` / `bash deploy/test.sh`, which install what is missing."
)


@dataclass(frozen=True)
class TlsListener:
    """Server certificate, its key and the CA that signs (and verifies) client certificates."""

    ca: Path
    cert: Path
    key: Path
    require_client_cert: bool = True


class MosquittoNotFound(RuntimeError):
    """No mosquitto binary on PATH or in /usr/sbin."""


def find_mosquitto() -> str:
    """Locate the broker binary; Debian puts it in /usr/sbin, often not on a user's PATH."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise MosquittoNotFound(INSTALL_HINT)
    return found


class MosquittoBroker:
    """One mosquitto process on 127.0.0.1 with persistence in its own directory.

    host: the address it listens on (and clients connect to), e.g. the root side of a veth
    pair so that agents in a network namespace reach it too.
    """

    def __init__(
        self,
        workdir: Path,
        max_queued_messages: int = 100_000,
        tls: TlsListener | None = None,
        identity: IdentityDir | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = find_mosquitto()
        self.host = host
        self.port = free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.tls_port: int | None = None
        self.identity = identity
        if identity is not None:
            if tls is not None:
                raise ValueError("pass tls or identity: the secure profile has its own TLS")
            self.config_path.write_text(self._secure_config(identity, max_queued_messages))
            return
        self.config_path.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.host}",
                    "allow_anonymous true",
                    # Persistence makes queued QoS 1 messages and sessions survive a restart.
                    "persistence true",
                    f"persistence_location {workdir}/",
                    "persistence_file mosquitto.db",
                    f"max_queued_messages {max_queued_messages}",
                    "max_inflight_messages 0",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_timestamp true",
                    *(self._tls_lines(tls) if tls else []),
                    "",
                ]
            )
        )

    def _secure_config(self, identity: IdentityDir, max_queued_messages: int) -> str:
        """The shipped configuration: TLS listener for devices, loopback one for coordinators."""
        identity.init(hosts=["localhost", self.host])
        self.tls_port = free_port()
        conf = BrokerConf(
            directory=identity.directory,
            tls_port=self.tls_port,
            tls_bind=self.host,
            local_port=self.port,
            max_queued_messages=max_queued_messages,
            persistence_dir=self.workdir,
            pid_file=self.workdir / "mosquitto.pid",
        )
        logs = ["log_type error", "log_type warning", "log_type notice", "log_timestamp true"]
        return render_conf(conf) + "\n".join(["", *logs, ""])

    @property
    def pid_file(self) -> Path:
        """Where the secure profile's broker writes its pid (for `fleet revoke --pid-file`)."""
        return self.workdir / "mosquitto.pid"

    def reload(self) -> None:
        """SIGHUP: re-read the password file and ACL (and drop clients no longer allowed)."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("the broker is not running")
        self._proc.send_signal(signal.SIGHUP)

    def _tls_lines(self, tls: TlsListener) -> list[str]:
        """A second listener on its own port: TLS, optionally requiring a client certificate."""
        self.tls_port = free_port()
        return [
            f"listener {self.tls_port} {self.host}",
            f"cafile {tls.ca}",
            f"certfile {tls.cert}",
            f"keyfile {tls.key}",
            f"require_certificate {'true' if tls.require_client_cert else 'false'}",
        ]

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        if self.running:
            return
        log = self.log_path.open("ab")
        # mosquitto refuses to run as root without a user it can drop to; `user` must be
        # the current one so it can write its persistence file in our temp dir.
        cfg = self.config_path.read_text()
        if os.geteuid() == 0 and "\nuser " not in cfg:
            self.config_path.write_text(cfg + "user root\n")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if not wait_listening(self.host, self.port, timeout=10):
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start on {self.host}:{self.port}; log:\n{self.read_log()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker cleanly (SIGTERM lets it write its persistence file)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        wait_closed(self.host, self.port, timeout=5)

    def kill(self) -> None:
        """Kill the broker without letting it save state (a crash or power loss)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same persistence."""
        self.stop()
        self.start()

    def read_log(self) -> str:
        """The broker's log so far, for assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
