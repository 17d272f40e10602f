"""Benchmark the coordinator's ingestion against the raw MQTT ceiling of this machine.

Prints one JSON report to stdout (progress to stderr) and writes it to --out.

Every figure drains the same backlog: MESSAGES telemetry windows of 1,000 devices (real
protocol payloads, 100 seqs... per device) queued by a private mosquitto for a persistent
session while its consumer is away, then timed from (re)connect to the last message stored.
Draining a backlog measures what the consumer can take, not what a publisher on the same two
cores can produce.

- ceiling_msgs_per_s: a bare paho MQTT 5 client, QoS 1, on the same shared subscription,
  doing nothing with each message.
- coordinator_msgs_per_s: one coordinator (decode + validate + SQLite WAL + manual acks after
  commit); ratio = coordinator / ceiling, median over interleaved repeats.
- lost: sequence numbers missing after all drains, summed over the runs.
- p99_lag_s, live_msgs_per_s, live_lost: live phase, 1,000 simulated devices, each on its own
  MQTT connection, publishing at --live-rate windows/s for --live-seconds while one coordinator
  ingests; lag = commit time - window end on the device (one clock: same machine).
- two_coordinators_ratio: two coordinator processes on one shared subscription and one
  PostgreSQL, over one coordinator on PostgreSQL; two_coordinators_lost likewise.
- tls_acl_ratio: one coordinator on the secure broker profile (a password per client, the ACL;
  the backlog published over TLS) over the same coordinator on the anonymous broker, median of
  per-round ratios, drained in the same rounds as the figures above (bench/secure.py; the
  report's tls_acl_method says what exactly was measured).

Run from the repository root: `.venv/bin/python -m bench.ingest [--out FILE]`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.report import emit_report, load_avg, machine_info, rounded_floats, say
from bench.secure import Endpoint, SecureFleet, start_secure
from edgefleet.agent.protocol import Percentiles, Telemetry, TopicTree, encode
from edgefleet.server.fleet.gc_tuning import tune_gc
from edgefleet.server.fleet.ingest import Ingestor
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.optimize.latency import Rounds, round_ratios
from tests.harness.postgres import postgres_server, scratch_database

ROOT = "bench/v1"
SHARE = "bench-coordinators"
DEVICES = 1000
Load = Callable[[list[tuple[str, bytes]]], None]  # queues a backlog on a broker


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=50_000, help="backlog size per drain")
    p.add_argument("--repeats", type=int, default=3, help="interleaved ceiling/coordinator pairs")
    p.add_argument("--live-seconds", type=float, default=30.0)
    p.add_argument("--live-rate", type=float, default=1.0, help="windows/s per device, live")
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--out", type=Path, default=Path("out/bench/ingest.json"))
    return p.parse_args(argv)


def telemetry_payloads(n: int, devices: int = DEVICES) -> list[tuple[str, bytes]]:
    """n real telemetry messages, round-robin over devices, seq 0.. per device."""
    tree = TopicTree(ROOT)
    now = time.time()
    out = []
    for i in range(n):
        dev, seq = f"dev-{i % devices:05d}", i // devices
        t = Telemetry(
            device_id=dev,
            seq=seq,
            window_start=now - 10,
            window_end=now,
            frames_captured=300,
            frames_processed=296,
            frames_dropped=4,
            fps=29.6,
            latency_ms=Percentiles(p50=3.1, p95=6.2, p99=8.0),
            stage_latency_ms=[Percentiles(p50=1.0, p95=2.0, p99=2.5)] * 3,
            exit_histogram=[200, 60, 36],
            operating_point=1,
            cpu_percent=95.0,
            rss_mb=120.0,
            temperature_c=55.0,
            throttled=False,
            power_w=4.2,
            power_source="estimate",
            energy_per_frame_mj=141.9,
            outbox_depth=0,
            outbox_overflow=0,
            model_id="mnist-ee",
            model_version=2,
        )
        out.append((tree.device(dev, "telemetry"), encode(t)))
    return out


def _session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 65535
    return props


def forget_session(ep: Endpoint, client_id: str) -> None:
    """Remove a persistent session, so later backlogs are not queued for it as well."""
    c = ep.client(client_id)
    c.connect(ep.host, ep.port, clean_start=True)
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


def preload(ep: Endpoint, payloads: list[tuple[str, bytes]]) -> None:
    """Publish the backlog as fast as the broker takes it, from one client."""
    pub = ep.client("bench-pub")
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect(ep.host, ep.port)
    pub.loop_start()
    infos = [pub.publish(topic, data, qos=1) for topic, data in payloads]
    for info in infos[-1000:]:
        info.wait_for_publish(300)
    pub.disconnect()
    pub.loop_stop()


def drain_bare(ep: Endpoint, payloads: list[tuple[str, bytes]], tag: str) -> float:
    """Messages per second a do-nothing paho client receives from a queued session."""
    n = len(payloads)
    got = [0]
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    def client() -> mqtt.Client:
        c = ep.client(f"bare-{tag}")
        c.on_message = on_message
        return c

    c = client()
    c.connect(ep.host, ep.port, clean_start=False, properties=_session_props())
    c.loop_start()
    c.subscribe(TopicTree.shared(SHARE + tag, TopicTree(ROOT).all_devices("telemetry")), 1)
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()
    preload(ep, payloads)
    c = client()
    t0 = time.perf_counter()
    c.connect(ep.host, ep.port, clean_start=False, properties=_session_props())
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"bare client received {got[0]} of {n}")
    rate = n / (time.perf_counter() - t0)
    c.disconnect()
    c.loop_stop()
    forget_session(ep, f"bare-{tag}")
    return rate


def _ingestor(
    ep: Endpoint, store: Store, client_id: str, share: str, writer_url: str | None = None
) -> Ingestor:
    ing = Ingestor(ep.ingest_config(ROOT, client_id, share), store, writer_url=writer_url)
    # IngestConfig has no TLS option yet: the TLS endpoint sets it on the coordinator's own
    # paho client, which is what such an option would do (credential: the same, set again).
    ep.secure(ing.client)
    return ing


def _subscribe_once(ep: Endpoint, store_url: str, client_id: str, share: str) -> None:
    store = open_store(store_url)
    ing = _ingestor(ep, store, client_id, share)
    ing.start()
    if not ing.wait_connected(10):
        raise RuntimeError(f"{client_id} could not connect")
    time.sleep(0.5)
    ing.stop()
    store.close()


def _drain_process(
    ep: Endpoint,
    store_url: str,
    client_id: str,
    share: str,
    n_total: int,
    solo: bool,
    ready: Any,
    go: Any,
    result: Any,
) -> None:
    """One coordinator process: resume the session, ingest until the store holds n_total."""
    store = open_store(store_url)
    ing = _ingestor(ep, store, client_id, share, writer_url=store_url)  # as `run` does
    tune_gc()
    ready.set()
    go.wait()
    t0 = time.perf_counter()
    ing.start()
    # Wait on the shared total only when another process writes too: count(*) on the
    # store would compete with the writer for the connection.
    while ing.stats.telemetry_inserted < n_total if solo else store.telemetry_count() < n_total:
        time.sleep(0.05 if solo else 0.25)
    result.put((client_id, time.perf_counter() - t0, ing.stats.telemetry_inserted))
    ing.stop()
    store.close()


def drain_coordinators(
    ep: Endpoint,
    payloads: list[tuple[str, bytes]],
    store_url: str,
    tag: str,
    count: int = 1,
    load: Load | None = None,
) -> tuple[float, int]:
    """Rate at which `count` coordinator processes drain the backlog into store_url; lost.

    load queues the backlog (default: one anonymous publisher on ep).
    """
    share = SHARE + tag
    ids = [ep.client_id(f"coord-{tag}-{i}") for i in range(count)]
    if len(set(ids)) != count:
        raise ValueError("one identity per coordinator: the username is the client id")
    for cid in ids:
        _subscribe_once(ep, store_url, cid, share)
    (load or (lambda p: preload(ep, p)))(payloads)
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in ids]
    go, result = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_drain_process,
            args=(
                ep,
                store_url,
                cid,
                share,
                len(payloads),
                count == 1,
                ready[i],
                go,
                result,
            ),
        )
        for i, cid in enumerate(ids)
    ]
    for p in procs:
        p.start()
    for r in ready:
        r.wait(60)
    go.set()
    times = [result.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join(30)
    for cid in ids:
        forget_session(ep, cid)
    store = open_store(store_url)
    lost = sum(r.missing for r in store.sequence_reports())
    stored = store.telemetry_count()
    store.close()
    if stored != len(payloads):
        raise RuntimeError(f"stored {stored} of {len(payloads)}")
    return len(payloads) / max(times), lost


def live_phase(
    broker: MosquittoBroker, store_url: str, seconds: float, rate: float
) -> dict[str, float]:
    """1,000 simulated devices (`edgefleet simulate`, its own process) and one coordinator."""
    store = open_store(store_url)
    ing = _ingestor(Endpoint.anonymous(broker), store, "coord-live", SHARE + "live", store_url)
    tune_gc()
    ing.start()
    ing.wait_connected(10)
    say(f"live: {DEVICES} devices for {seconds:.0f} s at {rate} windows/s each")
    started = time.time()
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet.server.cli",
            "simulate",
            "--devices",
            str(DEVICES),
            "--rate",
            str(rate),
            "--duration",
            str(seconds),
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--root",
            ROOT,
            "--prefix",
            "live",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        check=True,
    )
    sim_report = json.loads(sim.stdout)
    produced = int(sim_report["produced"])
    deadline = time.monotonic() + 120
    while ing.stats.telemetry_inserted < produced and time.monotonic() < deadline:
        time.sleep(0.1)
    # Steady state: windows that ended once every device was connected (1,000 connections
    # at 400/s take a few seconds, during which the first windows wait in device backlogs).
    steady_from = started + float(sim_report["connect_s"]) + 1.0
    lags = sorted(lag for end, lag in ing.stats.lags if end >= steady_from)
    every = sorted(lag for _end, lag in ing.stats.lags)
    store.declare_losses(time.time() + 3600, 0)
    lost = sum(r.missing + r.lost for r in store.sequence_reports())
    ing.stop()
    store.close()
    return {
        "live_msgs_per_s": float(sim_report["publish_rate"]),
        "live_produced": produced,
        "live_stored": ing.stats.telemetry_inserted,
        "live_lost": lost,
        "p50_lag_s": lags[len(lags) // 2] if lags else float("nan"),
        "p99_lag_s": lags[int(len(lags) * 0.99)] if lags else float("nan"),
        "p99_lag_including_connect_s": every[int(len(every) * 0.99)] if every else float("nan"),
        "max_lag_s": lags[-1] if lags else float("nan"),
    }


TLS_ACL_METHOD = (
    "tls_acl_ratio: one coordinator's msgs/s on the secure broker profile (the shipped "
    "deploy/mosquitto configuration: a password per client, the ACL, no anonymous access) over "
    "the same coordinator on the anonymous broker; median of per-round ratios, the drains of a "
    "round run back to back (order reversed every other round), each on the same backlog in "
    "the same order. The coordinator drains on the loopback listener with its own password, "
    "every delivery checked against the ACL, without TLS: IngestConfig has no TLS option "
    "(docs/security.md). On the secure broker the backlog is published over TLS by one "
    "coordinator-role identity that the ACL lets publish under every device, not by each "
    "device's own connection (that keeps the queue's order; the publish side is not timed). "
    "tls_acl_ratio_coordinator_tls: the same with the coordinator on the TLS listener too (the "
    "benchmark sets TLS on the coordinator's paho client, as such an option would)."
)


def sqlite_rounds(
    broker: MosquittoBroker,
    secure: SecureFleet,
    payloads: list[tuple[str, bytes]],
    work: Path,
    repeats: int,
) -> dict[str, Any]:
    """Interleaved SQLite drains: bare ceiling, coordinator, coordinator on the secure broker."""
    plain = Endpoint.anonymous(broker)

    def load_secure(p: list[tuple[str, bytes]]) -> None:
        preload(secure.publisher, p)

    def coordinator(
        ep: Endpoint, load: Load | None, tag: str
    ) -> Callable[[int], tuple[float, int]]:
        return lambda r: drain_coordinators(
            ep, payloads, f"sqlite:///{work / f'{tag}-{r}.db'}", f"{tag}{r}", load=load
        )

    contenders: dict[str, Callable[[int], tuple[float, int]]] = {
        "ceiling": lambda r: (drain_bare(plain, payloads, f"b{r}"), 0),
        "coordinator": coordinator(plain, None, "s"),
        "secure": coordinator(secure.loopback, load_secure, "l"),
        "secure_tls": coordinator(secure.tls, load_secure, "t"),
    }
    names = list(contenders)
    runs: Rounds = {k: [] for k in names}
    lost = dict.fromkeys(names, 0)
    for r in range(repeats):
        # Reversed every other round: the coordinator always runs next to both the ceiling
        # and the secure drain it is paired with, and no contender always goes first.
        for name in names if r % 2 == 0 else names[::-1]:
            rate, lost_r = contenders[name](r)
            runs[name].append(rate)
            lost[name] += lost_r
        rates = ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in runs.items())
        say(f"repeat {r + 1}/{repeats}: {rates}")
    secure_ratios = round_ratios(runs, "secure", "coordinator")
    return {
        "ceiling_msgs_per_s": statistics.median(runs["ceiling"]),
        "coordinator_msgs_per_s": statistics.median(runs["coordinator"]),
        "ratio": statistics.median(round_ratios(runs, "coordinator", "ceiling")),
        "lost": lost["coordinator"],
        "ceiling_runs": runs["ceiling"],
        "coordinator_runs": runs["coordinator"],
        "secure_coordinator_msgs_per_s": statistics.median(runs["secure"]),
        "tls_acl_ratio": statistics.median(secure_ratios),
        "tls_acl_ratio_runs": secure_ratios,
        "secure_tls_coordinator_msgs_per_s": statistics.median(runs["secure_tls"]),
        "tls_acl_ratio_coordinator_tls": statistics.median(
            round_ratios(runs, "secure_tls", "coordinator")
        ),
        "secure_lost": lost["secure"] + lost["secure_tls"],
        "secure_runs": runs["secure"],
        "secure_tls_runs": runs["secure_tls"],
        "tls_acl_method": TLS_ACL_METHOD,
    }


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    payloads = telemetry_payloads(args.messages)
    say(
        f"{len(payloads)} telemetry messages of {DEVICES} devices, "
        f"{sum(len(p) for _, p in payloads) / len(payloads):.0f} bytes each"
    )
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    broker = MosquittoBroker(work / "broker", max_queued_messages=10 * args.messages)
    broker.start()
    secure = start_secure(work / "secure", ROOT, 10 * args.messages)
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(),
        "load_avg_before": load_avg(),
        "messages": args.messages,
        "devices": DEVICES,
    }
    try:
        report.update(sqlite_rounds(broker, secure, payloads, work, args.repeats))
        report.update(
            live_phase(broker, f"sqlite:///{work / 'live.db'}", args.live_seconds, args.live_rate)
        )
        report["live_rate_per_device"] = args.live_rate
        if not args.skip_postgres:
            plain = Endpoint.anonymous(broker)
            with postgres_server() as admin:
                ones, twos, lost2 = [], [], 0
                for r in range(max(1, args.repeats - 1)):
                    with scratch_database(admin) as dsn:
                        one, _ = drain_coordinators(plain, payloads, dsn, f"p1{r}")
                    with scratch_database(admin) as dsn:
                        two, lost_r = drain_coordinators(plain, payloads, dsn, f"p2{r}", 2)
                    ones.append(one)
                    twos.append(two)
                    lost2 += lost_r
                    say(f"postgres {r + 1}: one {one:.0f}/s, two {two:.0f}/s")
                report["postgres_one_msgs_per_s"] = statistics.median(ones)
                report["postgres_two_msgs_per_s"] = statistics.median(twos)
                report["two_coordinators_ratio"] = statistics.median(
                    t / o for t, o in zip(twos, ones, strict=True)
                )
                report["two_coordinators_lost"] = lost2
    finally:
        secure.broker.stop()
        broker.stop()
    report["load_avg_after"] = load_avg()
    rounded: dict[str, Any] = rounded_floats(report)
    return rounded


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    emit_report(build_report(args), args.out, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
