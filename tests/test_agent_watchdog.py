"""systemd watchdog through a real NOTIFY_SOCKET: fed while the loop turns, silent when it hangs.

The hang is a real inference: a model slow by construction, sized on this machine before
the run, and the watchdog timeout is set from its measured time. So the test asks the same
question on any CPU: does a ping come while one inference outlasts the watchdog timeout?
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.bundle import (
    ExitHead,
    ManifestBody,
    Preprocessing,
    Provenance,
    Stage,
    TensorSpec,
    verify_bundle,
    write_bundle,
)
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.reference import VIDEO_PATH
from tests.agent_harness import reference_bundle
from tests.harness.notify import FakeSystemd, Message

# The slow model's inference is sized to about this long here: long enough that scheduling
# noise is small against it, short enough for a quick test.
HANG_TARGET_S = 2.0
CALIBRATION_DEPTH = 20  # MatMuls in the model that measures this machine's speed


def _texts(msgs: list[Message]) -> list[str]:
    return [m for _, m in msgs]


def _pings(msgs: list[Message]) -> list[float]:
    return [t for t, m in msgs if m == "WATCHDOG=1"]


def _slow_model(depth: int) -> bytes:
    """A classifier of `depth` chained (512x1024)x(1024x1024) MatMuls: time grows with depth."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32) / 32, "w")
    proj = numpy_helper.from_array(rng.standard_normal((64, 1024)).astype(np.float32), "proj")
    head = numpy_helper.from_array(rng.standard_normal((1024, 10)).astype(np.float32), "head")
    rows = numpy_helper.from_array(np.array([512, 1024], np.int64), "rows")
    nodes = [
        helper.make_node("Flatten", ["image"], ["f"]),
        helper.make_node("MatMul", ["f", "proj"], ["p"]),
        helper.make_node("Expand", ["p", "rows"], ["h0"]),
    ]
    for i in range(depth):  # one weight shared by every layer: the file stays small
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{depth}"], ["m"], axes=[0], keepdims=1))
    nodes.append(helper.make_node("MatMul", ["m", "head"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [w, proj, head, rows],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the agent supports (1.23 on 3.10)
    return model.SerializeToString()


def _slow_bundle(out: Path, key: FleetKey, depth: int) -> Path:
    """A valid, signed one-stage bundle of the slow classifier."""
    body = ManifestBody(
        model_id="slow",
        version=1,
        created_ts=time.time(),
        input=TensorSpec(name="image", shape=[1, 1, 8, 8]),
        preprocessing=Preprocessing(height=8, width=8, color="GRAY", mean=[0.5], std=[0.5]),
        labels=[str(i) for i in range(10)],
        stages=[
            Stage(
                file="model.onnx", inputs=["image"], exit=ExitHead(output="logits", kind="logits")
            )
        ],
        provenance=Provenance(source_model_sha256="0" * 64),
    )
    write_bundle(out, body, {"model.onnx": _slow_model(depth)}, key.private)
    return out


def _inference_s(bundle: Path, key: FleetKey) -> float:
    """Seconds one inference of the bundle takes here, as the agent runs it (one thread).

    The faster of two runs: the watchdog timeout derived from it errs on the short side,
    which only makes the hang look longer against it.
    """
    model = StagedModel(verify_bundle(bundle, [key.public]), threads=1)
    x = np.zeros((1, 1, 8, 8), np.float32)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        model.predict(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def _hang_bundle(root: Path) -> tuple[Path, FleetKey, float]:
    """The slow bundle sized so one inference takes about HANG_TARGET_S here, and that time."""
    key, _ = init_key(root / "keys")
    probe = _inference_s(_slow_bundle(root / "probe", key, CALIBRATION_DEPTH), key)
    depth = max(CALIBRATION_DEPTH, math.ceil(CALIBRATION_DEPTH * HANG_TARGET_S / probe))
    bundle = _slow_bundle(root / "slow", key, depth)
    return bundle, key, _inference_s(bundle, key)


def test_watchdog_fed_while_running_and_silent_when_inference_hangs(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    root = f"{topic_prefix}/edgefleet/v1"
    notify = FakeSystemd(str(tmp_path / "notify.sock"))

    # A quick model: frames flow, so a ping goes out every half timeout.
    timeout_s = 1.0
    bundle, key = reference_bundle(tmp_path / "ok")
    cfg = write_config(
        tmp_path / "ok", device_id="pi-wd", broker=mqtt_broker, topic_root=root,
        bundle=bundle, key=key,
    )  # fmt: skip
    env = {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": str(round(timeout_s * 1e6))}
    with AgentProcess(cfg, tmp_path / "ok.log", env=env) as agent:
        msgs = notify.collect_until(lambda m: len(_pings(m)) >= 5, 60)
        assert agent.terminate() == 0, agent.tail()
    assert any(m.startswith("READY=1") for m in _texts(msgs)), agent.tail()
    pings = _pings(msgs)
    # What systemd checks: no gap near the timeout (pings are due every timeout / 2).
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.5 * timeout_s, msgs
    # The agent exited, so everything it sent is already queued on the socket.
    assert "STOPPING=1" in notify.drain()

    # A model whose every inference outlasts the watchdog timeout: the loop turns (and may
    # ping) only between inferences, so the gaps between pings are as long as an inference.
    slow, slow_key, hang_s = _hang_bundle(tmp_path / "hang")
    timeout_s = hang_s / 2
    cfg = write_config(
        tmp_path / "slowcfg", device_id="pi-wd2", broker=mqtt_broker, topic_root=root,
        bundle=slow, key=slow_key, warmup_runs=0,  # start looping (and pinging) at once
    )  # fmt: skip
    env = {"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": str(round(timeout_s * 1e6))}
    with AgentProcess(cfg, tmp_path / "slow.log", env=env) as agent:
        msgs = notify.collect_until(lambda m: len(_pings(m)) >= 3, 60 + 10 * hang_s)
        assert agent.alive(), agent.tail()
    pings = _pings(msgs)
    # An agent that fed the watchdog during an inference would ping every timeout / 2;
    # this one must leave a gap past the timeout, after which systemd restarts it.
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) > timeout_s, f"inference {hang_s:.2f} s, timeout {timeout_s:.2f} s: {msgs}"
    notify.close()


def test_no_camera_at_boot_extends_the_start_and_says_why(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    """Start-up waits for the first frame without hitting TimeoutStartSec, then READY=1."""
    bundle, key = reference_bundle(tmp_path)
    video = tmp_path / "later.avi"
    cfg = write_config(
        tmp_path, device_id="pi-nocam", broker=mqtt_broker,
        topic_root=f"{topic_prefix}/edgefleet/v1", bundle=bundle, key=key, video=video,
    )  # fmt: skip
    notify = FakeSystemd(str(tmp_path / "notify.sock"))
    waiting_status = f"STATUS=waiting for camera {video}: "

    def says_why(msgs: list[Message]) -> bool:
        return any(
            m.startswith(waiting_status) and "no such device or file" in m for m in _texts(msgs)
        )

    with AgentProcess(
        cfg, tmp_path / "agent.log", env={"NOTIFY_SOCKET": notify.env_value}
    ) as agent:
        waiting = _texts(notify.collect_until(says_why, 60))
        assert not any(m.startswith("READY=1") for m in waiting), waiting
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in waiting), waiting
        shutil.copy(VIDEO_PATH, video)
        notify.collect_until(lambda m: any(t.startswith("READY=1") for t in _texts(m)), 60)
        assert agent.terminate() == 0, agent.tail()
    notify.close()
