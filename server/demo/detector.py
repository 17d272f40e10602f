"""The demo's detector: the reference digit detector optimized like the classifier, run by one
real agent on the reference detection video, its object events shown as `edgefleet fleet
show` prints them and checked against the video's truth.

The agent plays det_video.avi as its camera (looped, 30 frames a second). Its events carry
times, the truth carries frames: the agent's results (`telemetry.results = "every"`) carry
both, the capture time of a frame and the camera's frame counter, so a listener on its
results topic turns an event's first sighting back into a frame of the video (detect_truth.py).
"""

from __future__ import annotations

import bisect
import logging
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.protocol import Result, TopicTree, decode
from edgefleet.server.cli.fleet import _show_text
from edgefleet.server.datasets import scenes
from edgefleet.server.datasets.clips import write_validation_clip
from edgefleet.server.demo.checks import Checks
from edgefleet.server.demo.console import Story
from edgefleet.server.demo.detect_truth import (
    MIN_SECONDS,
    START_TOLERANCE,
    Anchor,
    Judgement,
    Sighting,
    VideoTruth,
    camera_frame,
    judge,
    pass_end,
)
from edgefleet.server.fleet.client import FleetClient
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.views import DeviceDetail, object_events
from edgefleet.server.keystore import FleetKey
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.identities import LocalIdentities
from edgefleet.server.local.waiting import WaitTimeout, poll_until
from edgefleet.server.optimize.detect.options import DetectOptions
from edgefleet.server.optimize.detect.run import optimize_detector
from edgefleet.server.reference import detect as ref

DEVICE = "demo-det-1"
# Its own group: the classifiers' rollouts, federated round and closed loop target theirs.
GROUP = "detect"
OBSERVER = "demo-observer"  # a read-only listener on the detector's results (a coordinator id)
INTERVAL_S = 2
PASS_TIMEOUT_S = 120  # for the agent to start and play one whole pass of the 20 s video
EVENTS_TIMEOUT_S = 15  # for its last events of the pass to reach the coordinator
STOP_TIMEOUT_S = 10
SHOW_EVENTS = 16  # one pass of the video: 8 digits, a start and an end each
SHOW_WINDOWS = 3
API_EVENTS = 1000  # the API's most; a demo run's detector sends far fewer
AGENT_CONFIG = (
    # Tracker as shipped; said here so the config file shows what the check assumes.
    "[detect.tracker]\nmin_hits = 3\nmax_missed = 10\n"
)
RESULTS = 'results = "every"\nresults_max_hz = 30\n'

log = logging.getLogger(__name__)


# -- the bundle ---------------------------------------------------------------------------


def build_detector(work: Path, key: FleetKey, story: Story, checks: Checks) -> dict[str, Any]:
    """`edgefleet optimize --task detect` on the reference detector: INT8 within 1 mAP point,
    motion-gate points calibrated on a validation clip; returns the optimizer's report."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "mnist-det-scenes.npz"
    # The train split (4,000 scenes) is what the model learnt from; the optimizer needs none.
    scenes.write_npz(data, ("calibration", "validation", "test"))
    clip, clip_truth = write_validation_clip(work / "gate-clip")
    opts = DetectOptions(
        max_drop=1.0,
        labels=list(ref.LABELS),
        model_id="mnist-det",
        version=1,
        gate_clip=clip,
        gate_truth=clip_truth,
        gate_max_drop=1.0,
        latency_samples=50,
    )
    report = optimize_detector(
        ref.DET_MODEL_PATH,
        data,
        work / "mnist-det-int8",
        ref.preprocessing(),
        ref.deployed_spec(),
        key,
        opts,
        progress=_log_progress,
    )
    budget = report["budget"]
    floor = budget["reference_val_metric"] - opts.max_drop / 100
    story.say(
        f"mAP@0.5 on {report['data']['sizes']['validation']} validation scenes: original "
        f"{budget['reference_val_metric']:.3f}, 8-bit {budget['val_metric']:.3f} (allowed: "
        f"{floor:.3f} or more)"
    )
    checks.check(
        "detector within its mAP budget",
        bool(budget["within"]),
        f"validation mAP@0.5 {budget['val_metric']:.4f}, floor {floor:.4f} "
        f"({budget['drop_points']:.2f} points lost)",
    )
    test = report["test"]
    speedup = report["ratios"]["int8_speedup"]
    story.say(
        f"on {test['int8']['images']} test scenes: mAP@0.5 {test['fp32']['map50']:.3f} -> "
        f"{test['int8']['map50']:.3f}; {report['latency_ms']['int8']:.2f} ms per frame, "
        f"{speedup:.1f}x the original's speed (one thread)"
    )
    points = report["gate"]["points"] if report.get("gate") else []
    story.say(
        "operating points (a motion gate skips still frames): "
        + ", ".join(f"{p['name']} skips {p['skip_fraction']:.0%}" for p in points)
        + (f"; the agent starts on {points[-1]['name']}" if points else "")
    )
    return report


def detector_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's figures that report.json keeps for the detector."""
    gate = report.get("gate") or {}
    return {
        "budget": report["budget"],
        "test_map50": {
            "fp32": report["test"]["fp32"]["map50"],
            "int8": report["test"]["int8"]["map50"],
        },
        "latency_ms": report["latency_ms"],
        "int8_speedup": report["ratios"]["int8_speedup"],
        "operating_points": gate.get("points", []),
        "seconds": report["seconds"],
    }


def _log_progress(line: str) -> None:
    log.info("detector optimizer: %s", line.strip())


# -- the agent ----------------------------------------------------------------------------


class ResultListener:
    """Subscribes to one device's results and keeps their (capture time, frame counter)."""

    def __init__(self, broker: MosquittoBroker, username: str, password: str, device: str):
        self._lock = threading.Lock()
        self._anchors: list[Anchor] = []
        self.topic = TopicTree().device(device, "results")
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(self.topic, qos=0)
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        res = decode(Result, bytes(msg.payload), topic=msg.topic)
        if isinstance(res, Result):
            with self._lock:
                bisect.insort(self._anchors, (res.ts, res.frame_index))

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and subscribed."""
        return self._subscribed.wait(timeout)

    def anchors(self) -> list[Anchor]:
        """Every result so far, by capture time."""
        with self._lock:
            return list(self._anchors)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class DetectorAgent:
    """The demo's one detector agent, its results listener, its show and checks."""

    device = DEVICE

    def __init__(self, out: Path, truth: VideoTruth | None = None) -> None:
        self.out = out
        self.log = out / f"{DEVICE}.log"
        self.truth = truth or VideoTruth.load()
        self.proc: AgentProcess | None = None
        self.listener: ResultListener | None = None
        self._cred_dir: Path | None = None
        self._observer_password = ""
        self._ca: Path | None = None

    def provision(self, creds: LocalIdentities) -> None:
        """Its credential and the listener's; before the broker starts, which reads them."""
        self._cred_dir = creds.agent(DEVICE, self.out / DEVICE / "credentials", group=GROUP)
        self._observer_password = creds.coordinator(OBSERVER)
        self._ca = creds.ids.ca

    def start(self, bundle: Path, key: FleetKey, broker: MosquittoBroker) -> None:
        """Listen to its results, then start the agent with det_video.avi as its camera."""
        assert self._cred_dir is not None, "provision() first"
        self.listener = ResultListener(broker, OBSERVER, self._observer_password, DEVICE)
        if not self.listener.wait_subscribed(10):
            raise RuntimeError(f"{OBSERVER} could not subscribe to {self.listener.topic}")
        config = write_config(
            self.out / DEVICE,
            device_id=DEVICE,
            broker=broker,
            bundle=bundle,
            key=key,
            video=ref.DET_VIDEO_PATH,
            fps=self.truth.fps,
            interval_s=INTERVAL_S,
            username=DEVICE,
            tls_ca=self._ca,
            group=GROUP,
            extra=AGENT_CONFIG,
        )
        text = config.read_text()
        # Every result (a frame's capture time and counter) is the clock of the check.
        config.write_text(text.replace("[telemetry]\n", f"[telemetry]\n{RESULTS}", 1))
        env = {"CREDENTIALS_DIRECTORY": str(self._cred_dir)}
        self.proc = AgentProcess(config, self.log, env=env)

    def wait_reporting(self, store: Store, checks: Checks, timeout: float) -> bool:
        """Wait for its first telemetry window; whether it came (a failed check, not a stop:
        the classifiers' steps do not need the detector)."""
        proc = self.proc
        assert proc is not None

        def reported() -> bool:
            return any(r.device_id == DEVICE and r.received for r in store.sequence_reports())

        poll_until(lambda: reported() or not proc.alive(), timeout)
        return checks.check(
            "detector agent running and sending telemetry",
            reported() and proc.alive(),
            f"{DEVICE} reported"
            if reported() and proc.alive()
            else f"{DEVICE} {'exited' if not proc.alive() else 'sent nothing'} (its log: "
            f"{self.log})",
        )

    def show_and_check(
        self, client: FleetClient, store: Store, story: Story, checks: Checks
    ) -> dict[str, Any]:
        """Wait for one pass of the video, print `fleet show`, check it, stop the agent.

        A detector that does not play the video through fails its checks and is stopped;
        the classifiers' steps go on.
        """
        proc, listener = self.proc, self.listener
        assert proc is not None and listener is not None
        story.say(
            f"waiting for {DEVICE} to play the whole {self.truth.frames / self.truth.fps:.0f} s "
            "video once ..."
        )

        def played() -> bool:
            a = listener.anchors()
            return bool(a) and max(c for _, c in a) >= pass_end(min(c for _, c in a), self.truth)

        poll_until(lambda: played() or not proc.alive(), PASS_TIMEOUT_S)
        anchors = listener.anchors()
        through = checks.check(
            "detector agent played the video through",
            played() and proc.alive(),
            f"{len(anchors)} results, frames {anchors[0][1]}..{max(c for _, c in anchors)}"
            if anchors and played() and proc.alive()
            else f"{len(anchors)} results after {PASS_TIMEOUT_S} s; alive: {proc.alive()} "
            f"(its log: {self.log})",
        )
        if not through:
            return {"exit_code": self.stop(store, story, checks)}
        # The events of the pass travel through the agent's outbox; give them a moment.
        detail = client.device(DEVICE, windows=100, events=API_EVENTS)
        verdict = self._judge(detail, listener.anchors())

        def arrived() -> bool:
            nonlocal detail, verdict
            detail = client.device(DEVICE, windows=100, events=API_EVENTS)
            verdict = self._judge(detail, listener.anchors())
            return verdict.ok

        poll_until(arrived, EVENTS_TIMEOUT_S, poll=1.0)
        shown = client.device(DEVICE, windows=SHOW_WINDOWS, events=SHOW_EVENTS)
        story.say(
            f"$ edgefleet fleet show {DEVICE} --windows {SHOW_WINDOWS} --events {SHOW_EVENTS}"
        )
        for line in _show_text(shown).splitlines():
            story.say("  " + line)
        result = self._check(detail, verdict, checks)
        story.say(
            f"{verdict.judged - len(verdict.missed)} of {verdict.judged} digits in view over "
            f"{MIN_SECONDS:g} s started an event of their class within {START_TOLERANCE} frames"
        )
        story.say(
            f"  of their first frame; {verdict.events - len(verdict.strays)} of {verdict.events} "
            "object_start events name a digit in view then"
        )
        story.say("  (the others: a short track of something read as a digit for a few frames)")
        result["exit_code"] = self.stop(store, story, checks)
        return result

    def _judge(self, detail: DeviceDetail, anchors: list[Anchor]) -> Judgement:
        events = object_events(detail.events)
        starts = [o for o in events if o.kind == "object_start"]
        # A track's class is voted over its life (docs/detect.md): a digit misread while it
        # slides in starts under the wrong label and ends under the right one.
        final = {o.track_id: o.label for o in events if o.kind == "object_end"}
        if not anchors:
            return Judgement()
        fps = self.truth.fps
        sightings = [
            Sighting(
                o.track_id or 0,
                final.get(o.track_id) or o.label or "?",
                camera_frame(o.start_ts, anchors, fps),
            )
            for o in starts
            if o.start_ts is not None
        ]
        counters = [c for _, c in anchors]
        # One whole pass from the detector's first frame: later passes would only repeat it.
        first = min(counters)
        return judge(self.truth, sightings, first, min(max(counters), pass_end(first, self.truth)))

    def _check(self, detail: DeviceDetail, verdict: Judgement, checks: Checks) -> dict[str, Any]:
        windows = [w.telemetry for w in detail.windows]
        counted = [t.object_counts for t in windows if t.object_counts]
        peak: dict[str, int] = {}
        for counts in counted:
            for label, n in counts.items():
                peak[label] = max(peak.get(label, 0), n)
        checks.check(
            "detector telemetry counts objects",
            bool(counted),
            f"{len(counted)} of {len(windows)} windows with object counts; most at once: "
            + (", ".join(f"{k}: {v}" for k, v in sorted(peak.items())) or "none"),
        )
        kinds = [o.kind for o in object_events(detail.events)]
        starts, ends = kinds.count("object_start"), kinds.count("object_end")
        checks.check(
            "detector sent object_start and object_end events",
            starts >= 1 and ends >= 1,
            f"{starts} object_start, {ends} object_end",
        )
        offsets = sorted(verdict.offsets)
        median = offsets[len(offsets) // 2] if offsets else 0
        checks.check(
            "detector's objects match the video's truth",
            verdict.ok,
            f"{verdict.judged - len(verdict.missed)} of {verdict.judged} digits in view over "
            f"{MIN_SECONDS:g} s started an event of their class within {START_TOLERANCE} frames "
            f"(median {median:+d}); {verdict.events - len(verdict.strays)} of {verdict.events} "
            "object_start events of a digit in view"
            + (f"; missed: {', '.join(verdict.missed)}" if verdict.missed else ""),
        )
        return {
            "windows_with_counts": len(counted),
            "peak_counts": peak,
            "object_starts": starts,
            "object_ends": ends,
            "judged": verdict.judged,
            "missed": verdict.missed,
            "strays": verdict.strays,
            "start_offsets": verdict.offsets,
        }

    def stop(self, store: Store, story: Story, checks: Checks) -> int | None:
        """SIGTERM, as systemd stops it; check the exit status and its offline status."""
        proc = self.proc
        assert proc is not None
        try:
            code: int | None = proc.terminate(STOP_TIMEOUT_S)
        except WaitTimeout:
            code = None

        def offline() -> bool:
            rec = store.device(DEVICE)
            return rec is not None and not rec.online

        poll_until(offline, STOP_TIMEOUT_S)
        checks.check(
            "detector agent stopped cleanly and shown offline",
            code == 0 and offline(),
            f"{DEVICE}: exit code {code}, {'offline' if offline() else 'still online'}"
            + ("" if code == 0 else f" (its log: {self.log})"),
        )
        story.say(f"{DEVICE} stopped (exit code {code}); the classifiers go on")
        return code

    def close(self) -> None:
        """Kill the agent if it still runs, disconnect the listener (the demo failed half-way)."""
        if self.proc is not None:
            self.proc.kill()
        if self.listener is not None:
            self.listener.close()
