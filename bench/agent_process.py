"""The agent as a device runs it: a real process, its memory, cold start and sustained fps.

`python -m edgefleet.agent run` (edgefleet.server.local.agents) against a private mosquitto
(edgefleet.server.local.broker), the camera replaying the reference video (`realtime =
false`: each frame handed over as soon as the previous one was taken, so fps is the agent's
own throughput), 1 s telemetry windows, 1 thread. A paho subscriber times the first result
and collects every telemetry window, so lost sequence numbers show.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.report import say
from edgefleet.agent.protocol import Result, Telemetry, TopicTree, decode_topic
from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import poll_until
from edgefleet.server.reference import VIDEO_PATH

FINAL_WINDOW_S = 5.0  # how long the last window (sent at shutdown, QoS 1) may take to arrive


class Watch:
    """A paho client on one device's results and telemetry: first result, telemetry seen."""

    def __init__(self, broker: MosquittoBroker, tree: TopicTree, device_id: str) -> None:
        self.tree = tree
        self.first: float | None = None
        self.count = 0
        self.telemetry: list[Telemetry] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topics = [
            (tree.device(device_id, "results"), 0),
            (tree.device(device_id, "telemetry"), 1),
        ]
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda c, *_a: c.subscribe(self._topics)
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("bench subscriber could not subscribe")

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        decoded = decode_topic(self.tree, msg.topic, bytes(msg.payload))
        with self._lock:
            if isinstance(decoded, Result):
                if self.first is None:
                    self.first = now
                self.count += 1
            elif isinstance(decoded, Telemetry):
                self.telemetry.append(decoded)

    def seqs(self) -> list[int]:
        """Telemetry sequence numbers received so far."""
        with self._lock:
            return [t.seq for t in self.telemetry]

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def missing(seqs: list[int]) -> list[int]:
    """Sequence numbers absent between 0 and the highest seen."""
    return sorted(set(range(max(seqs) + 1)) - set(seqs)) if seqs else []


def cold_start(
    root: Path,
    broker: MosquittoBroker,
    tree: TopicTree,
    out: Path,
    key: FleetKey,
    device_id: str,
    timeout: float = 30.0,
) -> tuple[float, AgentProcess, Watch]:
    """Spawn the agent and wait for its first result; returns seconds, process, watcher."""
    config = write_config(
        root,
        device_id=device_id,
        broker=broker,
        bundle=out / "bundle",
        key=key,
        topic_root=tree.root,
        realtime=False,
        interval_s=1.0,
    )
    watch = Watch(broker, tree, device_id)
    t0 = time.monotonic()
    proc = AgentProcess(config, root / "agent.log")
    # The time comes from the subscriber's callback, so the poll interval does not blur it.
    poll_until(lambda: watch.first is not None or not proc.alive(), timeout, poll=0.01)
    if watch.first is None:
        proc.kill()
        watch.close()
        raise RuntimeError(f"{device_id}: no result within {timeout} s; log:\n{proc.tail()}")
    return watch.first - t0, proc, watch


def process_section(
    work: Path, out: Path, key: FleetKey, run_s: float, extra_cold: int, bare_ms: float
) -> dict[str, Any]:
    """One long agent run (cold start, RSS, fps, telemetry seqs) plus extra cold starts."""
    broker = MosquittoBroker(work / "broker")
    broker.start()
    try:
        tree = TopicTree(f"bench-{uuid.uuid4().hex[:8]}")
        device = "bench-agent"
        say(f"agent process: cold start, then {run_s:.0f} s replaying {VIDEO_PATH.name}")
        first_s, proc, watch = cold_start(work / "run", broker, tree, out, key, device)
        with proc:
            say(f"  first result after {first_s:.3f} s")
            t_start = time.monotonic()
            # Fixed spans on purpose: memory after ~5 s, throughput over the whole run.
            time.sleep(max(0.0, 5.0 - (time.monotonic() - t_start)))
            rss_5s = psutil.Process(proc.pid).memory_info().rss / 2**20
            say(f"  rss after ~5 s: {rss_5s:.1f} MiB")
            time.sleep(max(0.0, run_s - (time.monotonic() - t_start)))
            proc_rss_end = psutil.Process(proc.pid).memory_info().rss / 2**20
            last_seq = max(watch.seqs(), default=-1)
            rc = proc.terminate()
        # The agent commits its last window at shutdown and publishes it (QoS 1).
        poll_until(lambda: max(watch.seqs(), default=-1) > last_seq, FINAL_WINDOW_S)
        watch.close()
        seqs = watch.seqs()
        telemetry = sorted(watch.telemetry, key=lambda t: t.seq)
        # Steady windows: drop the first two (start-up) and the last (cut short by SIGTERM).
        steady = telemetry[2:-1]
        frames = sum(t.frames_processed for t in steady)
        span = sum(t.window_end - t.window_start for t in steady)
        fps = frames / span if span > 0 else 0.0
        lat = [t.latency_ms.p50 for t in steady]
        exits = [
            sum(t.exit_histogram[e] for t in steady)
            for e in range(len(steady[0].exit_histogram) if steady else 0)
        ]
        say(f"  sustained {fps:.1f} fps over {len(steady)} windows; agent exit status {rc}")
        colds = [first_s]
        for k in range(extra_cold):
            s, p, w = cold_start(work / f"cold{k}", broker, tree, out, key, f"bench-cold{k}")
            with p:
                p.terminate()
            w.close()
            colds.append(s)
            say(f"  extra cold start {k + 1}: {s:.3f} s")
    finally:
        broker.stop()
    return {
        "rss_mb": rss_5s,
        "cold_start_s": statistics.median(colds),
        "fps": fps,
        "fps_ceiling_ratio": fps / (1000.0 / bare_ms),
        "telemetry_seq_missing": len(missing(seqs)),
        "agent_process": {
            "cold_starts_s": colds,
            "cold_start_first_run_s": first_s,
            "rss_mb_at_end": proc_rss_end,
            "run_s": run_s,
            "telemetry_windows": len(telemetry),
            "telemetry_seqs": [min(seqs), max(seqs)] if seqs else None,
            "telemetry_duplicates": len(seqs) - len(set(seqs)),
            "steady_windows": len(steady),
            "steady_fps_per_window": [
                round(t.frames_processed / (t.window_end - t.window_start), 1)
                for t in steady
                if t.window_end > t.window_start
            ],
            "steady_frames_captured": sum(t.frames_captured for t in steady),
            "steady_capture_fps": sum(t.frames_captured for t in steady) / span
            if span > 0
            else 0.0,
            "steady_frames_processed": frames,
            "steady_frames_dropped": sum(t.frames_dropped for t in steady),
            "steady_exit_histogram": exits,
            "steady_latency_p50_ms_median": statistics.median(lat) if lat else None,
            "steady_cpu_percent_median": statistics.median(t.cpu_percent for t in steady)
            if steady
            else None,
            "agent_rss_mb_reported_median": statistics.median(t.rss_mb for t in steady)
            if steady
            else None,
            "results_received": watch.count,
            "exit_status": rc,
            "fps_ceiling": 1000.0 / bare_ms,
        },
    }
