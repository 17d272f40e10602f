"""systemd watchdog through a real NOTIFY_SOCKET: fed while the loop turns, silent when it hangs."""

from __future__ import annotations

import itertools
import socket
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
    write_bundle,
)
from edgefleet.server.localbroker import MosquittoBroker
from tests.agent_harness import AgentProcess, reference_bundle, write_config


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def _collect(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    out: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            continue
    return out


def _slow_bundle(root: Path) -> tuple[Path, Path]:
    """A valid, signed classifier whose one stage takes seconds per frame: a hung inference."""
    _, key = reference_bundle(root / "ref")  # creates a key we reuse
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
    x = "h0"
    for i in range(300):  # 300 chained (512x1024)x(1024x1024) MatMuls: seconds per frame
        nodes.append(helper.make_node("MatMul", [x, "w"], [f"h{i + 1}"]))
        x = f"h{i + 1}"
    nodes.append(helper.make_node("ReduceMean", [x], ["m"], axes=[0], keepdims=1))
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
    write_bundle(root / "slow", body, {"model.onnx": model.SerializeToString()}, key.private)
    return root / "slow", key.public_path


def test_watchdog_fed_while_running_and_silent_when_inference_hangs(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    root = f"{topic_prefix}/edgefleet/v1"
    bundle, key = reference_bundle(tmp_path / "ok")
    cfg = write_config(
        tmp_path / "ok",
        device_id="pi-wd",
        broker=mqtt_broker,
        topic_root=root,
        bundle=bundle,
        key=key,
    )
    sock = _listen(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    agent = AgentProcess(cfg, tmp_path / "ok.log", env=env)
    try:
        msgs = _collect(sock, 8)
    finally:
        agent.terminate()
    texts = [m for _, m in msgs]
    assert any(m.startswith("READY=1") for m in texts), agent.output()[-2000:]
    pings = [t for t, m in msgs if m == "WATCHDOG=1"]
    assert len(pings) >= 5  # about every 0.5 s while frames flow
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.5
    assert any(m.startswith("STOPPING=1") for m in [m for _, m in _collect(sock, 0.5)] + texts)

    # The same agent on a bundle whose inference hangs for seconds: the pings stop.
    slow, slow_key = _slow_bundle(tmp_path)
    (tmp_path / "slowcfg").mkdir()
    from edgefleet.server.keystore import load_key

    cfg2 = write_config(
        tmp_path / "slowcfg",
        device_id="pi-wd2",
        broker=mqtt_broker,
        topic_root=root,
        bundle=slow,
        key=load_key(slow_key.parent),
    )
    # No warm-up: the loop must start (and ping) before the first slow inference hangs it.
    cfg2.write_text(cfg2.read_text().replace("threads = 1\n", "threads = 1\nwarmup_runs = 0\n"))
    _collect(sock, 0.3)  # drop what the first agent sent while stopping
    agent = AgentProcess(cfg2, tmp_path / "slow.log", env=env)
    try:
        msgs = _collect(sock, 12)
        assert agent.alive()
    finally:
        agent.kill()
    # The loop ran and fed the watchdog; then, while an inference hangs, no ping comes for
    # seconds: systemd would kill and restart it.
    pings = [t for t, m in msgs if m == "WATCHDOG=1"]
    assert pings, f"the loop never fed the watchdog: {msgs}\n{agent.output()[-2000:]}"
    marks = [*pings, time.monotonic()]
    assert max(b - a for a, b in itertools.pairwise(marks)) > 3.0, msgs
    sock.close()


def test_no_camera_at_boot_extends_the_start_and_says_why(
    tmp_path: Path, mqtt_broker: MosquittoBroker, topic_prefix: str
) -> None:
    """Start-up waits for the first frame without hitting TimeoutStartSec, then READY=1."""
    import shutil

    from edgefleet.server.reference import VIDEO_PATH

    bundle, key = reference_bundle(tmp_path)
    video = tmp_path / "later.avi"
    cfg = write_config(
        tmp_path, device_id="pi-nocam", broker=mqtt_broker,
        topic_root=f"{topic_prefix}/edgefleet/v1", bundle=bundle, key=key, video=video,
    )  # fmt: skip
    sock = _listen(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(sock.getsockname())}
    agent = AgentProcess(cfg, tmp_path / "agent.log", env=env)
    try:
        waiting = _collect(sock, 4)
        texts = [m for _, m in waiting]
        assert not any(m.startswith("READY=1") for m in texts), texts
        assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in texts), texts
        assert any(
            m.startswith(f"STATUS=waiting for camera {video}: ") and "no such device or file" in m
            for m in texts
        ), texts
        shutil.copy(VIDEO_PATH, video)
        later = [m for _, m in _collect(sock, 8)]
        assert any(m.startswith("READY=1") for m in later), agent.output()[-2000:]
    finally:
        agent.terminate()
        sock.close()
