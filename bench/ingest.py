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
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.report import emit_report, load_avg, machine_info, rounded_floats, say
from edgefleet.agent.protocol import Percentiles, Telemetry, TopicTree, encode
from edgefleet.server.fleet.gc_tuning import tune_gc
from edgefleet.server.fleet.ingest import IngestConfig, Ingestor
from edgefleet.server.fleet.store import open_store
from edgefleet.server.local.broker import MosquittoBroker
from tests.harness.postgres import postgres_server, scratch_database

ROOT = "bench/v1"
SHARE = "bench-coordinators"
DEVICES = 1000


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


def forget_session(broker: MosquittoBroker, client_id: str) -> None:
    """Remove a persistent session, so later backlogs are not queued for it as well."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port, clean_start=True)
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


def preload(broker: MosquittoBroker, payloads: list[tuple[str, bytes]]) -> None:
    """Publish the backlog as fast as the broker takes it."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    infos = [pub.publish(topic, data, qos=1) for topic, data in payloads]
    for info in infos[-1000:]:
        info.wait_for_publish(300)
    pub.disconnect()
    pub.loop_stop()


def drain_bare(broker: MosquittoBroker, payloads: list[tuple[str, bytes]], tag: str) -> float:
    """Messages per second a do-nothing paho client receives from a queued session."""
    n = len(payloads)
    got = [0]
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    def client() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{tag}", protocol=mqtt.MQTTv5)
        c.on_message = on_message
        return c

    c = client()
    c.connect(broker.host, broker.port, clean_start=False, properties=_session_props())
    c.loop_start()
    c.subscribe(TopicTree.shared(SHARE + tag, TopicTree(ROOT).all_devices("telemetry")), 1)
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()
    preload(broker, payloads)
    c = client()
    t0 = time.perf_counter()
    c.connect(broker.host, broker.port, clean_start=False, properties=_session_props())
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"bare client received {got[0]} of {n}")
    rate = n / (time.perf_counter() - t0)
    c.disconnect()
    c.loop_stop()
    forget_session(broker, f"bare-{tag}")
    return rate


def _coordinator_cfg(broker: MosquittoBroker, client_id: str, share: str) -> IngestConfig:
    return IngestConfig(
        host=broker.host, port=broker.port, root=ROOT, client_id=client_id, share_group=share
    )


def _subscribe_once(broker: MosquittoBroker, store_url: str, client_id: str, share: str) -> None:
    store = open_store(store_url)
    ing = Ingestor(_coordinator_cfg(broker, client_id, share), store)
    ing.start()
    if not ing.wait_connected(10):
        raise RuntimeError(f"{client_id} could not connect")
    time.sleep(0.5)
    ing.stop()
    store.close()


def _drain_process(
    host: str,
    port: int,
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
    cfg = IngestConfig(host=host, port=port, root=ROOT, client_id=client_id, share_group=share)
    ing = Ingestor(cfg, store, writer_url=store_url)  # as `edgefleet-server run` does
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
    broker: MosquittoBroker,
    payloads: list[tuple[str, bytes]],
    store_url: str,
    tag: str,
    count: int = 1,
) -> tuple[float, int]:
    """Rate at which `count` coordinator processes drain the backlog into store_url; lost."""
    share = SHARE + tag
    ids = [f"coord-{tag}-{i}" for i in range(count)]
    for cid in ids:
        _subscribe_once(broker, store_url, cid, share)
    preload(broker, payloads)
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in ids]
    go, result = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_drain_process,
            args=(
                broker.host,
                broker.port,
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
        forget_session(broker, cid)
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
    ing = Ingestor(
        _coordinator_cfg(broker, "coord-live", SHARE + "live"), store, writer_url=store_url
    )
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


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    payloads = telemetry_payloads(args.messages)
    say(
        f"{len(payloads)} telemetry messages of {DEVICES} devices, "
        f"{sum(len(p) for _, p in payloads) / len(payloads):.0f} bytes each"
    )
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    broker = MosquittoBroker(work / "broker", max_queued_messages=10 * args.messages)
    broker.start()
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "when": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": machine_info(),
        "load_avg_before": load_avg(),
        "messages": args.messages,
        "devices": DEVICES,
    }
    try:
        ceilings, coords, lost = [], [], 0
        for r in range(args.repeats):
            ceilings.append(drain_bare(broker, payloads, f"b{r}"))
            rate, lost_r = drain_coordinators(
                broker, payloads, f"sqlite:///{work / f'one-{r}.db'}", f"s{r}"
            )
            coords.append(rate)
            lost += lost_r
            say(
                f"repeat {r + 1}/{args.repeats}: ceiling {ceilings[-1]:.0f}/s, "
                f"coordinator {rate:.0f}/s"
            )
        report["ceiling_msgs_per_s"] = statistics.median(ceilings)
        report["coordinator_msgs_per_s"] = statistics.median(coords)
        report["ratio"] = statistics.median(c / b for c, b in zip(coords, ceilings, strict=True))
        report["lost"] = lost
        report["ceiling_runs"] = ceilings
        report["coordinator_runs"] = coords
        report.update(
            live_phase(broker, f"sqlite:///{work / 'live.db'}", args.live_seconds, args.live_rate)
        )
        report["live_rate_per_device"] = args.live_rate
        if not args.skip_postgres:
            with postgres_server() as admin:
                ones, twos, lost2 = [], [], 0
                for r in range(max(1, args.repeats - 1)):
                    with scratch_database(admin) as dsn:
                        one, _ = drain_coordinators(broker, payloads, dsn, f"p1{r}")
                    with scratch_database(admin) as dsn:
                        two, lost_r = drain_coordinators(broker, payloads, dsn, f"p2{r}", 2)
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
