"""Benchmark a rollout: 50 devices activate a 5 MB bundle pushed once through the broker.

Prints progress to stderr and one JSON report last on stdout (also written to --out).

Setup: a private mosquitto on loopback, the real coordinator in this process (HTTP API, rollout
engine ticking every 0.2 s, SQLite), `--agents` real `python -m edgefleet.agent run` processes
(camera = the reference video unpaced, `realtime = false`, results published for every frame)
and `--devices - --agents` simulated install-only devices (bench.install_devices: the real
Link, UpdateManager, Slots, download, staging, signature check and onnxruntime health check,
no camera). v1 is the reference model through the real optimizer (INT8 early-exit bundle);
v2 is v1 with its exit heads changed (a federated round) plus an incompressible pad array in its
golden file so the archive is --size-mb. Uploaded and rolled out through the API the CLI
uses: canary 1, soak 0, waves 10%,50%,100%. The coordinator does not hold v1, so every
device gets the full archive.

- activate_50_s: rollout created -> every device's state `active` in the store (--devices).
- published_bytes_ratio: bytes the coordinator published for v2 / (archive size x devices).
- delta_fraction: archive of a heads-only v2 (no pad) as a delta on v1 / its full archive.
- swap_gap_ms: the real agents' `installed` event `swap_ms` (time inside the loop's switch),
  median over agents: the headline. swap_gap_outside_ms: from the results stream (one per
  frame up to 100/s, QoS 0, timed by their capture ts): the largest interval between results
  within 0.25 s of the installed event minus the median interval before the rollout, median
  over agents. install_stall_outside_ms: the same from the end of the download to the swap
  (staging, health check and swap together).
- fps_during_transfer_ratio: a real agent's telemetry fps over its download (downloading ->
  verifying events, windows weighted by overlap) / fps over the windows before, when it
  downloads a full archive alone after the fleet rollout (median of --solo-repeats);
  fps_during_fleet_rollout_ratio: the same for the real agents during the 50-device rollout,
  whose simulated devices share this machine's cores with them. Results are rate-limited to
  100/s (results_max_hz), so the outside gaps resolve ~10 ms at best.

Run from the repository root: `.venv/bin/python -m bench.rollout [--out FILE]`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.install_devices import InstallDevice, InstallFleet
from bench.report import emit_report, load_avg, machine_info, report_head, rounded_floats, say
from edgefleet.agent.bundle import MANIFEST_NAME, ManifestBody, pack, verify_bundle
from edgefleet.agent.bundle.delta import make_delta
from edgefleet.agent.bundle.writer import write_bundle
from edgefleet.agent.config import MqttConfig, UpdateConfig
from edgefleet.agent.protocol import Result, Telemetry, TopicTree, decode_topic
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.reference import MODEL_PATH, load_reference_split, reference_preprocessing

GROUP = "bench"
TOKEN = "bench-rollout-token"
SWAP_SPAN_S = 0.25  # results either side of the installed event that count as around the swap
BEFORE_S = 4.0  # telemetry before the rollout, for the fps baseline and the result interval


# ---------------------------------------------------------------- bundles


def optimized_v1(work: Path, key: FleetKey) -> Path:
    """The reference model through the real optimizer: the INT8 early-exit bundle, v1."""
    write_splits_npz(load_reference_split(), work / "data.npz")
    t0 = time.monotonic()
    optimize(
        MODEL_PATH,
        work / "data.npz",
        work / "opt",
        reference_preprocessing(),
        key,
        OptimizeOptions(latency_samples=20),
        progress=lambda m: None,
    )
    say(f"optimizer: v1 built in {time.monotonic() - t0:.1f} s")
    return work / "opt" / "bundle"


def next_version(
    v1: Path, out: Path, key: FleetKey, pad_bytes: int, *, version: int = 0, pad_seed: int = 13
) -> Path:
    """v1 with every exit head's bias moved (a federated round), plus a pad.

    Its version is `version`, or v1's + 1; pads of different seeds share no bytes.
    """
    m = verify_bundle(v1, [key.public]).manifest
    files: dict[str, bytes | Path] = {name: v1 / name for name in m.files}
    for stage in m.stages:
        head = stage.exit.head_file if stage.exit is not None else None
        if head is None:
            continue
        arrays = dict(np.load(io.BytesIO((v1 / head).read_bytes())))
        arrays["bias"] = arrays["bias"] + np.float32(0.01)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        files[head] = buf.getvalue()
    if pad_bytes > 0 and m.health is not None:
        # Only referenced files may be in a bundle: the pad rides in the golden file as an
        # extra array the health check does not read (incompressible, so the archive grows).
        golden = dict(np.load(io.BytesIO((v1 / m.health.golden_file).read_bytes())))
        golden["pad"] = np.frombuffer(np.random.default_rng(pad_seed).bytes(pad_bytes), np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **golden)
        files[m.health.golden_file] = buf.getvalue()
    body = json.loads((v1 / MANIFEST_NAME).read_bytes())
    for k in ("signer", "files"):
        body.pop(k)
    body["version"] = version or m.version + 1
    write_bundle(out, ManifestBody.model_validate(body), files, key.private)
    return out


def delta_section(work: Path, v1: Path, key: FleetKey) -> dict[str, Any]:
    """A heads-only v2 (no pad): its delta on v1 over its full archive."""
    v2 = next_version(v1, work / "heads-only", key, 0)
    full = pack(v2, work / "heads-only.tar.gz").stat().st_size
    info = make_delta(v2, v1, work / "heads-only-delta.tar.gz")
    say(f"delta: {info.bytes} of {full} bytes ({', '.join(info.files)})")
    return {
        "delta_fraction": info.bytes / full,
        "delta_bytes": info.bytes,
        "full_bytes": full,
        "delta_files": list(info.files),
    }


def sized_version(work: Path, v1: Path, key: FleetKey, size_mb: float, version: int = 2) -> Path:
    """The archive of a `version` whose size is about size_mb MB (its pad its own)."""
    probe = next_version(v1, work / "probe", key, 0)
    base = pack(probe, work / "probe.tar.gz").stat().st_size
    pad = max(0, int(size_mb * 1e6) - base)
    out = work / f"v{version}"
    built = next_version(v1, out, key, pad, version=version, pad_seed=13 + version)
    return pack(built, work / f"v{version}.tar.gz")


# ---------------------------------------------------------------- watching the real agents


class Watch:
    """Results (arrival time per device) and telemetry of the real agents."""

    def __init__(self, broker: MosquittoBroker, tree: TopicTree, devices: list[str]) -> None:
        self.tree = tree
        self.results: dict[str, list[float]] = {d: [] for d in devices}
        self.telemetry: dict[str, list[Telemetry]] = {d: [] for d in devices}
        self._lock = threading.Lock()
        subscribed = threading.Event()
        topics = [(tree.device(d, "results"), 0) for d in devices]
        topics += [(tree.device(d, "telemetry"), 1) for d in devices]
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda c, *_a: c.subscribe(topics)
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("bench subscriber could not subscribe")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        decoded = decode_topic(self.tree, msg.topic, bytes(msg.payload))
        with self._lock:
            if isinstance(decoded, Result):
                # The frame's capture time on the device: arrival times come in TCP bursts.
                self.results[decoded.device_id].append(decoded.ts)
            elif isinstance(decoded, Telemetry):
                self.telemetry[decoded.device_id].append(decoded)

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def window_fps(windows: list[Telemetry], t0: float, t1: float) -> float | None:
    """Frames per second over [t0, t1], each window weighted by its overlap with it."""
    frames = span = 0.0
    for w in windows:
        length = w.window_end - w.window_start
        overlap = min(t1, w.window_end) - max(t0, w.window_start)
        if length <= 0 or overlap <= 0:
            continue
        frames += w.frames_processed * overlap / length
        span += overlap
    return frames / span if span > 0 else None


def agent_figures(
    client: FleetClient, watch: Watch, device: str, created: float, rollout_id: str
) -> dict[str, Any]:
    """One real agent: download interval, fps before/during, swap_ms and the outside gap."""
    events = [e.event for e in client.device(device, windows=0, events=1000).events]
    states = [
        (e.ts, e.details.get("install_state"), e.details)
        for e in events
        if e.details.get("rollout_id") == rollout_id
    ]
    dl = [ts for ts, s, _ in states if s == "downloading"]
    ver = [ts for ts, s, _ in states if s == "verifying"]
    inst = [(ts, d) for ts, s, d in states if s == "active"]
    if not dl or not ver or not inst:
        raise RuntimeError(f"{device}: install events missing: {[s for _, s, _ in states]}")
    dl_t0, dl_t1 = min(dl), min(ver)
    installed_ts, details = inst[-1]
    windows = sorted(watch.telemetry[device], key=lambda t: t.seq)
    before_windows = [w for w in windows if w.window_end <= created][2:]  # skip start-up
    fps_before = window_fps(before_windows, created - BEFORE_S, created)
    fps_during = window_fps(windows, dl_t0, dl_t1)
    times = sorted(watch.results[device])
    before = [b - a for a, b in itertools.pairwise(times) if b <= created]
    median_ms = statistics.median(before[-200:]) * 1e3 if before else None

    def gap(t0: float, t1: float) -> float | None:
        """Largest result interval touching [t0, t1] minus the median one before."""
        spans = [b - a for a, b in itertools.pairwise(times) if t0 <= b and a <= t1]
        return max(spans) * 1e3 - median_ms if spans and median_ms is not None else None

    # The swap happens confirm_frames frames (~10 ms here) before the installed event.
    outside = gap(installed_ts - SWAP_SPAN_S, installed_ts + SWAP_SPAN_S)
    # From the end of the download to after the swap: staging, the health check, the swap.
    stall = gap(dl_t1, installed_ts + SWAP_SPAN_S)
    return {
        "download_s": dl_t1 - dl_t0,
        "fps_before": fps_before,
        "fps_during_transfer": fps_during,
        "fps_during_transfer_ratio": fps_during / fps_before
        if fps_during is not None and fps_before
        else None,
        "swap_ms": details.get("swap_ms"),
        "result_interval_median_ms": median_ms,
        "swap_gap_outside_ms": outside,
        "install_stall_outside_ms": stall,
        "transfer": details.get("transfer"),
        "chunks_received": details.get("chunks_received"),
        "duplicates": details.get("duplicates"),
        "rerequests": details.get("rerequests"),
    }


SOLO_GROUP = "bench-solo"


def solo_rollout(client: FleetClient, device: str, sha: str) -> str:
    """Roll sha out to device alone, in a group of its own.

    A status the agent publishes (after an install, on a reconnect) names the group of its
    config and moves it back (the device's word wins, docs/coordinator.md): assign, create
    at once, and assign again if a status came in between.
    """
    for _ in range(10):
        client.assign_group(device, SOLO_GROUP)
        try:
            return client.create_rollout(
                {"bundle_sha256": sha, "group": SOLO_GROUP, "canary": "1", "soak_s": 0}
            ).rollout_id
        except ApiError as exc:
            if "has no devices" not in str(exc):
                raise
            time.sleep(0.5)
    raise RuntimeError(f"{device} kept leaving group {SOLO_GROUP}")


def solo_transfers(
    args: argparse.Namespace,
    client: FleetClient,
    watch: Watch,
    device: str,
    work: Path,
    v1: Path,
    key: FleetKey,
    logs: Callable[[], str],
) -> list[dict[str, Any]]:
    """One real agent downloads a full --size-mb archive while nothing else installs.

    What a device's own transfer costs its inference: in the fleet rollout above, 49 other
    devices' downloads and health checks share this machine's 2 cores with it, which is not
    the case on a real fleet. Each repeat is a new version whose pad (nearly all of the
    archive) shares no byte with the one running, so it travels, as a delta of the pad and
    the manifest or whole; the agent sits in a group of its own for it.
    """
    out: list[dict[str, Any]] = []
    for k in range(args.solo_repeats):
        archive = sized_version(work / f"solo-{k}", v1, key, args.size_mb, version=3 + k)
        sha = client.upload_bundle(archive.read_bytes()).sha256
        time.sleep(BEFORE_S + 1.0)  # quiet windows before, for the baseline
        created = time.time()
        rid = solo_rollout(client, device, sha)

        def done(rid: str = rid) -> bool:
            return client.rollout(rid).phase == "done"

        wait_until(done, 120, "solo install", detail=logs)
        state = client.rollout(rid)
        if state.counts != {"active": 1}:
            raise RuntimeError(f"solo install {k} of {device} ended {state.counts}")
        time.sleep(1.5)  # the telemetry window that covers the download's end
        figures = agent_figures(client, watch, device, created, rid)
        say(
            f"solo transfer {k + 1}/{args.solo_repeats}: {figures['download_s']:.2f} s, "
            f"fps ratio {figures['fps_during_transfer_ratio']}"
        )
        out.append(figures)
    return out


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the bundles, start the fleet, roll v2 out, collect the figures."""
    key, _ = init_key(work / "keys")
    v1 = optimized_v1(work, key)
    delta = delta_section(work, v1, key)
    archive = sized_version(work, v1, key, args.size_mb)
    size = archive.stat().st_size
    say(f"v2 archive: {size / 1e6:.2f} MB")
    broker = MosquittoBroker(work / "broker")
    broker.start()
    tree = TopicTree(f"bench-{uuid.uuid4().hex[:8]}")
    n_sim = args.devices - args.agents
    agents: dict[str, AgentProcess] = {}
    sims: InstallFleet | None = None
    coordinator: Coordinator | None = None
    watch: Watch | None = None
    try:
        (work / "coordinator").mkdir()
        coordinator = Coordinator(
            CoordinatorConfig(
                store=f"sqlite:///{work / 'coordinator' / 'fleet.db'}",
                mqtt=IngestConfig(host=broker.host, port=broker.port, root=tree.root),
                http_port=0,
                token=TOKEN,
                fleet_keys=[key.public_path],
                rollout_tick_s=0.2,
                state_dir=work / "coordinator",
            )
        )
        coordinator.start()
        assert coordinator.ingestor.wait_connected(10)
        client = FleetClient(coordinator.url, TOKEN)
        names = [f"agent-{i}" for i in range(args.agents)]
        watch = Watch(broker, tree, names)
        update = "[update]\nconfirm_frames = 10\nrerequest_s = 5\ngive_up_s = 120\n"
        for name in names:
            cfg = write_config(
                work / name,
                device_id=name,
                broker=broker,
                bundle=v1,
                key=key,
                topic_root=tree.root,
                realtime=False,
                interval_s=1.0,
                group=GROUP,
                extra=update,
            )
            text = cfg.read_text().replace(
                "[telemetry]\n", '[telemetry]\nresults = "every"\nresults_max_hz = 100\n'
            )
            cfg.write_text(text)
            agents[name] = AgentProcess(cfg, work / f"{name}.log")
        mqtt_cfg = MqttConfig(host=broker.host, port=broker.port, topic_root=tree.root)
        ucfg = UpdateConfig(confirm_frames=10, rerequest_s=5, give_up_s=120)
        sims = InstallFleet(
            [
                InstallDevice(work / "sims", f"sim-{i:03d}", GROUP, mqtt_cfg, v1, key, ucfg)
                for i in range(n_sim)
            ]
        )
        sims.start()

        def logs() -> str:
            return "\n".join(f"--- {n}\n{a.tail(1500)}" for n, a in agents.items())

        def online() -> bool:
            devices = client.devices(GROUP)
            ready = sum(d.online and d.bundle_sha256 is not None for d in devices)
            return bool(ready >= args.devices)

        wait_until(online, 90, f"{args.devices} devices online", detail=logs)
        say(f"{args.devices} devices online ({args.agents} agents); {BEFORE_S:.0f} s baseline")
        time.sleep(BEFORE_S + 2.0)  # telemetry windows before the rollout: a fixed span
        sha = client.upload_bundle(archive.read_bytes()).sha256
        created = time.time()
        t0 = time.monotonic()
        view = client.create_rollout(
            {
                "bundle_sha256": sha,
                "group": GROUP,
                "canary": "1",
                "soak_s": 0,
                "waves": args.waves,
            }
        )
        rid = view.rollout_id
        box: dict[str, Any] = {}

        def all_active() -> bool:
            v = client.rollout(rid)
            box["v"] = v
            if v.counts != box.get("counts"):
                box["counts"] = v.counts
                say(f"  {time.monotonic() - t0:6.1f} s  {v.phase}: {v.counts}")
            return v.counts.get("active", 0) >= args.devices or v.phase == "done"

        wait_until(all_active, args.timeout, "every device active", detail=logs)
        activate_s = time.monotonic() - t0
        final = box["v"]
        if final.counts.get("active", 0) < args.devices:
            raise RuntimeError(f"rollout ended without every device active: {final}")
        say(f"all {args.devices} active after {activate_s:.1f} s")
        wait_until(lambda: client.rollout(rid).phase == "done", 30, "rollout done", detail=logs)
        final = client.rollout(rid)
        time.sleep(2.0)  # the last telemetry windows and results after the swaps
        bundle = next(b for b in client.bundles() if b.sha256 == sha)
        published = bundle.published_bytes or 0
        per_agent = {n: agent_figures(client, watch, n, created, rid) for n in names}
        sim_swap = [ms for d in sims.devices for ms in d.swap_ms]
        solo = solo_transfers(args, client, watch, names[0], work, v1, key, logs)
    finally:
        if watch is not None:
            watch.close()
        if sims is not None:
            sims.stop()
        for a in agents.values():
            a.terminate(5)
        if coordinator is not None:
            coordinator.stop()
        broker.stop()

    def med(key: str, figures: list[dict[str, Any]] | None = None) -> float | None:
        rows = list(per_agent.values()) if figures is None else figures
        vals = [f[key] for f in rows if isinstance(f.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    return {
        "activate_50_s": activate_s,
        "published_bytes_ratio": published / (size * args.devices),
        "delta_fraction": delta["delta_fraction"],
        "swap_gap_ms": med("swap_ms"),
        "swap_gap_outside_ms": med("swap_gap_outside_ms"),
        "install_stall_outside_ms": med("install_stall_outside_ms"),
        "fps_during_transfer_ratio": med("fps_during_transfer_ratio", solo),
        "fps_during_fleet_rollout_ratio": med("fps_during_transfer_ratio"),
        "devices": args.devices,
        "real_agents": args.agents,
        "archive_bytes": size,
        "published_bytes": published,
        "delta": delta,
        "per_agent": per_agent,
        "solo_transfers": solo,
        "sim_swap_ms_median": statistics.median(sim_swap) if sim_swap else None,
        "rollout": {"id": rid, "state": final.state, "counts": final.counts},
    }


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run and assemble the JSON report."""
    started = time.monotonic()
    result = report_head(f"rollout: {args.devices} devices, {args.size_mb:g} MB bundle, loopback")
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        result |= run(args, Path(tmp))
    result["notes"] = {
        "activate_50_s": f"rollout created -> all {args.devices} devices active in the store "
        "(canary 1, soak 0, waves " + args.waves + "); one wall time, not a ratio: it depends "
        "on this machine (the health checks build onnxruntime sessions per device)",
        "swap_gap_ms": "headline: median over real agents of the installed event's swap_ms "
        "(inside the loop's switch); swap_gap_outside_ms: largest interval between result capture "
        "times within 0.25 s of the installed event minus the median interval before (results "
        "are capped at 100/s, so ~10 ms resolution); install_stall_outside_ms: the same from "
        "the end of the download to the swap (staging + health check in the agent process)",
        "fps_during_transfer_ratio": "camera unpaced (realtime = false): fps is what spare CPU "
        "allows. Headline: one agent downloading a full archive while no other device installs "
        "(median of --solo-repeats), what a device's own transfer takes from its inference; "
        "fps_during_fleet_rollout_ratio: the real agents during the 50-device rollout, where "
        "the simulated devices' downloads and health checks share this 2-core machine with "
        "them (a real fleet does not); paced cameras would hide both",
    }
    result["load_avg"]["end"] = load_avg()
    result["machine"] = machine_info()
    result["seconds"] = round(time.monotonic() - started, 1)
    rounded: dict[str, Any] = rounded_floats(result)
    return rounded


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("out/bench/rollout.json"))
    p.add_argument("--devices", type=int, default=50, help="devices in all, agents included")
    p.add_argument("--agents", type=int, default=3, help="real agent processes among them")
    p.add_argument("--size-mb", type=float, default=5.0, help="v2 archive size")
    p.add_argument("--waves", default="10%,50%,100%")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the rollout")
    p.add_argument(
        "--solo-repeats", type=int, default=3, help="one agent's transfers alone, for the fps ratio"
    )
    args = p.parse_args(argv)
    if not 1 <= args.agents <= args.devices:
        p.error("--agents must be between 1 and --devices")
    return args


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    """Run the benchmark, print the JSON, write it to --out."""
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    emit_report(build_report(args), args.out, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
