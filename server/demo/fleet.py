"""The demo's local fleet: a broker, a coordinator, real agents on the reference video and a
crowd of simulated devices; the operator's view as `edgefleet fleet ls` prints it, a command
through the coordinator's API, rollouts and a federated round, then a clean stop whose
outcome is checked."""

from __future__ import annotations

import secrets
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgefleet.server.cli.fleet import device_rows, legend, table
from edgefleet.server.demo.checks import Checks
from edgefleet.server.demo.closedloop import DEMO_LOOP, run_loop
from edgefleet.server.demo.console import Story
from edgefleet.server.demo.detector import DetectorAgent
from edgefleet.server.demo.federated import AGENT_CONFIG, run_round
from edgefleet.server.demo.rollout import GROUP, run_rollouts
from edgefleet.server.federated.client import RoundClient
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.views import DeviceView
from edgefleet.server.identity import IdentityDir
from edgefleet.server.keystore import PRIVATE_NAME, FleetKey
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.identities import LocalIdentities, anonymous_answer
from edgefleet.server.local.waiting import WaitTimeout, poll_until
from edgefleet.server.reference import VIDEO_PATH

INTERVAL_S = 2  # the agents' telemetry window
WINDOWS_BEFORE_VIEW = 3  # telemetry windows each agent sends before the fleet view is shown
FIRST_REPORT_TIMEOUT_S = 90  # loading a bundle and opening a camera: slow on a busy Pi
STOP_TIMEOUT_S = 10  # systemd's TimeoutStopSec in the agent's unit
SETTLE_TIMEOUT_S = 30  # for the last messages to arrive and the offline statuses to show
PING_TIMEOUT_S = 10
SHOWN_OTHERS = 4  # simulated devices shown in the fleet view, after the real agents
COORDINATOR_ID = "demo-coordinator"  # its broker username, hence (the broker says) its client id


@dataclass(frozen=True)
class FleetPlan:
    """How big the local fleet is."""

    agents: int = 2
    simulated: int = 48


def exit_text(code: int | None) -> str:
    """An exit status in words: 'exit code 0', 'killed by SIGKILL'; None: it did not stop."""
    if code is None:
        return f"still running after {STOP_TIMEOUT_S} s (killed)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _received(store: Store) -> dict[str, int]:
    """Telemetry windows stored per device."""
    return {r.device_id: r.received for r in store.sequence_reports()}


class _Agents:
    """The demo's real agents, started, watched and stopped together."""

    def __init__(self, out: Path, ids: list[str]) -> None:
        self.out = out
        self.ids = ids
        self.logs = {i: out / f"{i}.log" for i in ids}
        self.procs: dict[str, AgentProcess] = {}
        self.cred_dirs: dict[str, Path] = {}
        self.ca: Path | None = None

    def provision(self, creds: LocalIdentities) -> None:
        """Give each agent its own credential; before the broker starts, which reads them."""
        # With their group: the broker's ACL lets a device read its group's commands only.
        self.cred_dirs = {
            i: creds.agent(i, self.out / i / "credentials", group=GROUP) for i in self.ids
        }
        self.ca = creds.ids.ca

    def start(self, bundle: Path, key: FleetKey, broker: MosquittoBroker, extra: str = "") -> None:
        """Start one agent per id, the shipped video its camera, its own credential over TLS;
        extra: further config sections (the [federated] one)."""
        for i in self.ids:
            config = write_config(
                self.out / i,
                device_id=i,
                broker=broker,
                bundle=bundle,
                key=key,
                video=VIDEO_PATH,
                interval_s=INTERVAL_S,
                username=i,
                tls_ca=self.ca,
                group=GROUP,
                extra=extra,
            )
            env = {"CREDENTIALS_DIRECTORY": str(self.cred_dirs[i])}  # systemd's LoadCredential=
            self.procs[i] = AgentProcess(config, self.logs[i], env=env)

    def exited(self) -> dict[str, int]:
        """The agents that have ended, with their exit status."""
        return {i: a.proc.returncode for i, a in self.procs.items() if not a.alive()}

    def terminate(self) -> dict[str, int | None]:
        """SIGTERM to all at once, then each one's exit status (None: killed after the wait)."""
        for a in self.procs.values():
            if a.alive():
                a.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for i, a in self.procs.items():
            try:
                codes[i] = a.wait(STOP_TIMEOUT_S)
            except WaitTimeout:
                codes[i] = None
        return codes

    def kill(self) -> None:
        """Kill any agent still running (the demo failed half-way)."""
        for a in self.procs.values():
            a.kill()


def run_fleet(
    out: Path,
    bundle: Path,
    key: FleetKey,
    story: Story,
    checks: Checks,
    plan: FleetPlan = FleetPlan(),
    rollout: Path | None = None,
    fed_holdout: Path | None = None,
    catalogue_data: Path | None = None,
    detector: Path | None = None,
) -> dict[str, Any]:
    """Run the local fleet, show the operator's view and a command, stop it, check the outcome.

    The agents start on `bundle`; with `rollout`, that bundle is then pushed to them through
    a canary rollout, followed by a bad bundle that must be halted and rolled back. With
    `fed_holdout` too, the agents collect pseudo-labelled features from the start and a
    federated round of `rollout`'s exit heads follows, judged on that held-out set. With
    `catalogue_data` too (the source model's labelled data), the coordinator's catalogue builds a
    variant and its closed loop moves the agents by itself (server/demo/closedloop.py).
    With `detector` (a detect bundle), one more agent runs it on the reference detection
    video, in a group of its own, until its object events are shown and checked
    (server/demo/detector.py); it is stopped then, so the steps after it run as before.

    Raises StepFailed (after recording the check) when the fleet cannot go on.
    """
    out.mkdir(parents=True, exist_ok=True)
    # The shipped broker configuration (TLS, a password per client, the ACL, no anonymous).
    creds = LocalIdentities(IdentityDir(out / "identity"))
    broker = MosquittoBroker(out / "broker", identity=creds.ids)
    token = secrets.token_hex(16)
    coordinator = Coordinator(
        CoordinatorConfig(
            store=f"sqlite:///{out / 'coordinator.db'}",
            mqtt=IngestConfig(
                host=broker.host,
                port=broker.port,  # the loopback listener: a password, no TLS (same host)
                client_id=COORDINATOR_ID,
                username=COORDINATOR_ID,
                password=creds.coordinator(COORDINATOR_ID),
            ),
            http_port=0,
            token=token,
            fleet_keys=[key.public_path],
            rollout_tick_s=0.5,
            # A round signs its result to roll it out unattended (docs/coordinator.md).
            signing_key=key.directory / PRIVATE_NAME if fed_holdout is not None else None,
            fed_holdout=fed_holdout,
            loop=DEMO_LOOP,
        )
    )
    sim_cfg = SimConfig(
        host=broker.host,
        port=broker.port,
        devices=plan.simulated,
        rate=0.5,
        prefix="sim-cam",
        group="simulated",
    )
    sim_cfg = replace(sim_cfg, passwords=creds.devices(sim_cfg.device_ids(), sim_cfg.group))
    sim = Simulator(sim_cfg)
    agents = _Agents(out, [f"demo-pi-{i + 1}" for i in range(plan.agents)])
    agents.provision(creds)
    det = DetectorAgent(out) if detector is not None else None
    if det is not None:
        det.provision(creds)
    coordinator_started = False
    try:
        broker.start()
        coordinator.start()
        coordinator_started = True
        story.say(
            f"MQTT broker (mosquitto) with the shipped config: devices on TLS port "
            f"{broker.tls_port}, each with its own password; no anonymous clients"
        )
        story.say(f"coordinator (registry, telemetry, commands) with its API on {coordinator.url}")
        connected = coordinator.ingestor.wait_connected(10)
        checks.require(
            "coordinator connected to the broker",
            connected,
            f"{broker.host}:{broker.port}" if connected else "no connection within 10 s",
        )
        answer = anonymous_answer(broker.host, broker.port)
        checks.check(
            "broker refuses an anonymous client", answer == "Not authorized", f"CONNACK: {answer}"
        )
        federated = rollout is not None and fed_holdout is not None
        agents.start(bundle, key, broker, extra=AGENT_CONFIG if federated else "")
        if det is not None and detector is not None:
            det.start(detector, key, broker)
        sim.start()
        ids, sim_ids = agents.ids, sim_cfg.device_ids()
        running = "the original bundle" if rollout is not None else "the optimized bundle"
        story.say(f"{' and '.join(ids)}: the real device agent, running {running}")
        story.say("  with the reference video as their camera")
        if det is not None:
            story.say(f"{det.device}: the same agent running the optimized detector, the")
            story.say("  reference detection video as its camera")
        story.say(f"{plan.simulated} simulated devices ({sim_ids[0]} ... {sim_ids[-1]}) send")
        story.say("  made-up telemetry, so the fleet view shows more than two devices")
        story.say(
            f"waiting for {WINDOWS_BEFORE_VIEW} telemetry reports from each agent "
            f"(one every {INTERVAL_S} s) ..."
        )
        _agents_reporting(coordinator.store, agents, checks)
        shown = ids
        if det is not None:
            det.wait_reporting(coordinator.store, checks, FIRST_REPORT_TIMEOUT_S)
            shown = [*ids, det.device]

        client = RoundClient(coordinator.url, token)
        fleet = client.devices()
        _show_fleet(fleet, shown, story)
        online = sum(d.online for d in fleet)
        expected = plan.agents + plan.simulated + len(shown) - len(ids)
        checks.check(
            "every device online in the fleet view",
            len(fleet) == expected and online == expected,
            f"{online} of {len(fleet)} devices online, {expected} started",
        )
        ping_ok = _ping(client, ids[0], story, checks)
        pushed: dict[str, Any] = {}
        if det is not None:
            pushed["detector"] = det.show_and_check(client, coordinator.store, story, checks)
        if rollout is not None:
            pushed.update(run_rollouts(client, ids, rollout, key, out, story, checks))
        if federated:
            pushed.update(run_round(client, coordinator.store, ids, story, checks))
        if federated and catalogue_data is not None:
            pushed.update(run_loop(coordinator, token, ids, catalogue_data, story, checks))

        story.say("stopping: SIGTERM to each agent (as systemd stops a service); the simulated")
        story.say("  devices send what they still hold, then disconnect")
        result = _stop_and_account(coordinator.store, agents, sim, sim_ids, story, checks)
        return {
            "devices": len(fleet),
            "online_at_view": online,
            "agents_reporting": sum(
                1 for d in fleet if d.device_id in ids and d.fps is not None and d.fps > 0
            ),
            "ping_ok": ping_ok,
            **pushed,
            **result,
        }
    finally:
        agents.kill()
        if det is not None:
            det.close()
        sim.stop()
        if coordinator_started:
            coordinator.stop()
        broker.stop()


def _agents_reporting(store: Store, agents: _Agents, checks: Checks) -> None:
    """Wait for every agent's first reports; an agent that dies ends the wait at once."""

    def reported() -> bool:
        got = _received(store)
        return all(got.get(i, 0) >= WINDOWS_BEFORE_VIEW for i in agents.ids)

    started = time.monotonic()
    poll_until(lambda: reported() or bool(agents.exited()), FIRST_REPORT_TIMEOUT_S)
    waited = time.monotonic() - started
    exited = agents.exited()
    got = _received(store)
    problems = [f"{i} {exit_text(c)} (its log: {agents.logs[i]})" for i, c in exited.items()] + [
        f"{i} had sent {got.get(i, 0)} of {WINDOWS_BEFORE_VIEW} reports after {waited:.0f} s "
        f"(its log: {agents.logs[i]})"
        for i in agents.ids
        if i not in exited and got.get(i, 0) < WINDOWS_BEFORE_VIEW
    ]
    checks.require(
        "agents running and sending telemetry",
        not problems,
        "; ".join(problems)
        or f"{WINDOWS_BEFORE_VIEW} reports from each of {len(agents.ids)} agents",
    )


def _show_fleet(fleet: list[DeviceView], ids: list[str], story: Story) -> None:
    """The operator's view, formatted as `edgefleet fleet ls` prints it, with a legend."""
    shown = [d for d in fleet if d.device_id in ids]
    shown += [d for d in fleet if d.device_id not in ids][:SHOWN_OTHERS]
    story.say(f"$ edgefleet fleet ls        (first {len(shown)} of {len(fleet)} devices)")
    for line in table(device_rows(shown)).splitlines():
        story.say("  " + line)
    for line in legend(shown):
        story.say("  " + line)


def _ping(client: FleetClient, device_id: str, story: Story, checks: Checks) -> bool:
    """`edgefleet fleet cmd DEVICE ping`: the same API call, which publishes the command and
    collects the device's reply by its id; returns whether it came back ok."""
    story.say(f"$ edgefleet fleet cmd {device_id} ping")
    sent = time.monotonic()
    outcome = client.command({"name": "ping"}, device=device_id, timeout_s=PING_TIMEOUT_S)
    took_ms = (time.monotonic() - sent) * 1000
    for r in outcome.replies:
        answer = "ok" if r.ok else f"error: {r.error}"
        story.say(f"  {r.device_id}: {answer}   (the reply took {took_ms:.0f} ms)")
    for silent in outcome.missing:
        story.say(f"  {silent}: no reply within {PING_TIMEOUT_S} s")
    ok = bool(outcome.replies) and all(r.ok for r in outcome.replies) and not outcome.missing
    checks.check(
        "ping answered through the coordinator's API",
        ok,
        f"{device_id} answered in {took_ms:.0f} ms"
        if ok
        else "; ".join(
            [f"{r.device_id}: {r.error}" for r in outcome.replies if not r.ok]
            + [f"{silent}: no reply in {PING_TIMEOUT_S} s" for silent in outcome.missing]
        ),
    )
    return ok


def _stop_and_account(
    store: Store,
    agents: _Agents,
    sim: Simulator,
    sim_ids: list[str],
    story: Story,
    checks: Checks,
) -> dict[str, Any]:
    """Stop agents and simulator; check exit codes, offline statuses and that nothing was lost."""
    codes = agents.terminate()
    checks.check(
        "agents stopped cleanly on SIGTERM",
        all(c == 0 for c in codes.values()),
        ", ".join(
            f"{i}: {exit_text(c)}" + ("" if c == 0 else f" (its log: {agents.logs[i]})")
            for i, c in codes.items()
        ),
    )
    sim.pause()
    drained = sim.wait_drained(SETTLE_TIMEOUT_S)
    produced = sim.stats().produced

    def offline() -> list[str]:
        return [i for i in agents.ids if (rec := store.device(i)) is not None and not rec.online]

    def sim_stored() -> int:
        got = _received(store)
        return sum(got.get(i, 0) for i in sim_ids)

    poll_until(lambda: offline() == agents.ids and sim_stored() >= produced, SETTLE_TIMEOUT_S)
    gone = offline()
    checks.check(
        "stopped agents shown offline",
        gone == agents.ids,
        f"offline: {', '.join(gone) or 'none'} (of {', '.join(agents.ids)})",
    )
    missing = sum(r.missing for r in store.sequence_reports())
    stored = store.telemetry_count()
    checks.check(
        "no telemetry missing",
        drained and missing == 0 and sim_stored() >= produced,
        f"{stored} reports stored, {missing} gaps in sequence numbers; simulated devices "
        f"sent {produced}, {sim_stored()} stored"
        + ("" if drained else f"; {sim.stats().backlog} still unsent after {SETTLE_TIMEOUT_S} s"),
    )
    rejected = sum(store.reject_counts().values())
    checks.check("no message rejected by the coordinator", rejected == 0, f"{rejected} rejected")
    story.say(
        "agents stopped: "
        + ", ".join(f"{i} {exit_text(c)}" for i, c in codes.items())
        + f"; shown offline: {', '.join(gone) or 'none'}"
    )
    story.say(
        f"telemetry: {stored} reports stored, {missing} missing (by sequence number), "
        f"{rejected} rejected"
    )
    return {
        "agent_exit_codes": list(codes.values()),
        "telemetry_windows": stored,
        "missing": missing,
        "rejected": rejected,
        "agents_offline_after_stop": gone,
        "events": len(store.events(limit=1000)),
    }
