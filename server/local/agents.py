"""Real agents on one machine: an agent.toml for a local run, and the agent as a child process.

A local agent reads a video file as its camera (looped: it never runs out), trusts one fleet
key, talks to a local broker with a short keepalive and quick camera reconnects (a local
run should notice a change in about a second, not after a production backoff), and keeps
its state in its own directory. The process is `python -m edgefleet.agent run`, exactly as
systemd starts it, with its output in a log file that failures quote.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import WaitTimeout
from edgefleet.server.reference import VIDEO_PATH

TAIL_CHARS = 3000  # enough of a log to show the last start-up or the traceback


def write_config(
    root: Path,
    *,
    device_id: str,
    broker: MosquittoBroker,
    bundle: Path,
    key: FleetKey,
    topic_root: str | None = None,
    video: Path | None = None,
    realtime: bool = True,
    fps: float = 30,
    interval_s: float = 1.0,
    warmup_runs: int | None = None,
    username: str | None = None,
    tls_ca: Path | None = None,
    group: str | None = None,
    extra: str = "",
) -> Path:
    """Write root/agent.toml for a local agent and return its path.

    video None: a private copy of the reference video in root (a test may delete or replace
    it). realtime False replays the file as fast as the agent takes frames (fps unused).
    topic_root None keeps the agent's default; extra is appended as further TOML sections.
    tls_ca: connect to the broker's TLS listener trusting this CA (its secure profile); the
    password, if any, goes where systemd would put it (AgentProcess env CREDENTIALS_DIRECTORY).
    """
    root.mkdir(parents=True, exist_ok=True)
    if video is None:
        video = root / "camera.avi"
        shutil.copy(VIDEO_PATH, video)
    pacing = f"fps = {fps:g}\n" if realtime else "realtime = false\n"
    topic = f'topic_root = "{topic_root}"\n' if topic_root is not None else ""
    warmup = f"warmup_runs = {warmup_runs}\n" if warmup_runs is not None else ""
    port = broker.port
    if tls_ca is not None:
        if broker.tls_port is None:
            raise ValueError("tls_ca needs a broker with a TLS listener")
        port = broker.tls_port
        extra = f'{extra}\n[mqtt.tls]\nca = "{tls_ca}"\n'
    user = f'username = "{username}"\n' if username is not None else ""
    path = root / "agent.toml"
    group_line = f'group = "{group}"\n' if group is not None else ""
    path.write_text(
        f'device_id = "{device_id}"\n'
        f"{group_line}"
        f'state_dir = "{root / "state"}"\n'
        "[camera]\n"
        f'source = "{video}"\nloop = true\n{pacing}'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        "[model]\n"
        f'bundle = "{bundle}"\ntrusted_keys = ["{key.public_path}"]\nthreads = 1\n{warmup}'
        "[mqtt]\n"
        f'host = "{broker.host}"\nport = {port}\n{user}{topic}'
        "keepalive_s = 5\n"
        "[telemetry]\n"
        f"interval_s = {interval_s:g}\n"
        '[power]\nsource = "auto"\n' + extra
    )
    return path


class AgentProcess:
    """`python -m edgefleet.agent run --config CONFIG` as a child process, output in `log`.

    env adds to (or overrides) this process's environment, e.g. NOTIFY_SOCKET. prefix runs
    the agent through a command that execs it, e.g. `ip netns exec NAME`. Leaving a
    `with` block kills an agent that still runs, so a failed test or benchmark leaves none.
    """

    def __init__(
        self,
        config: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.log = log
        # The child keeps its own descriptor of the log; ours is not needed after the start.
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "edgefleet.agent", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                # Unbuffered: a log line is in the file when the agent has written it.
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    @property
    def pid(self) -> int:
        """The agent's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the agent to exit on its own; its exit status (killed if it does not end)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # never leave a stray agent behind a failed wait
            raise WaitTimeout(
                f"agent {self.config} still ran after {timeout:g} s; killed it. "
                f"Its log ends:\n{self.tail()}"
            ) from None

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (a clean stop, as systemd sends it) and wait; returns the exit status.

        An agent still running after timeout seconds is killed and WaitTimeout raised:
        systemd would have killed it too (TimeoutStopSec=10 in the unit).
        """
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything (a crash or power loss); no-op once it ended."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def output(self) -> str:
        """Everything the agent logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, chars: int = TAIL_CHARS) -> str:
        """The end of the log, for failure messages."""
        return self.output()[-chars:]

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
