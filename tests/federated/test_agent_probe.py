"""StagedModel.probe_frame: a frame at full depth gives each early exit's features and the
final head's prediction, the same numbers the batch path computes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.camera import Frame
from edgefleet.agent.config import load_config
from edgefleet.agent.federated import HeadWeights
from edgefleet.agent.service import Agent
from edgefleet.server.local.agents import write_config
from edgefleet.server.local.broker import MosquittoBroker

from .test_agent_support import exits_bundle, load_model, video_frames


def test_probe_features_are_what_each_head_reads_and_the_prediction_is_final(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    model, pre = load_model(bundle, key)
    m = model.manifest
    heads = []
    for stage in m.early_exits:
        spec = m.stages[stage].exit
        assert spec is not None and spec.head_file is not None
        heads.append(HeadWeights.from_npz_bytes(model.verified.read(spec.head_file)))
    frames = video_frames()[:40]
    first = model.probe_frame(frames[0], pre)
    kept = [f.copy() for f in first.features]
    for frame in frames:
        probe = model.probe_frame(frame, pre)
        reference = model.all_exit_logits(pre(frame))  # plain session.run, no early stop
        assert len(probe.features) == len(heads) == len(reference) - 1
        for head, feats, want in zip(heads, probe.features, reference[:-1], strict=False):
            assert feats.dtype == np.float32 and feats.shape == (head.weight.shape[1],)
            got = feats @ head.weight.T + head.bias
            np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(probe.logits, reference[-1].reshape(-1), rtol=1e-5, atol=1e-5)
        pred = probe.prediction
        assert pred.exit_index == len(heads)  # counted as the final head's answer
        assert pred.class_index == int(reference[-1].argmax())
        assert 0.0 < pred.confidence <= 1.0 and len(pred.stage_ms) == len(m.stages)
        # Whatever the thresholds say, a probe answers from the final head.
        assert model.predict_frame(frame, pre).exit_index <= len(heads)
    # Features are copies: later frames did not overwrite the first frame's.
    for a, b in zip(first.features, kept, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_agent_probes_every_nth_frame_and_counts_it_as_a_final_answer(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    cfg = write_config(
        tmp_path, device_id="pi-probe", broker=mqtt_broker, topic_root="t/fed/v1",
        bundle=bundle, key=key, extra="[federated]\nenabled = true\nprobe_every = 4\n",
    )  # fmt: skip
    agent = Agent(load_config(cfg), threading.Event())  # the link is never started
    try:
        assert agent.collector is not None and agent.fed_worker is not None
        window = agent._new_window()
        frames = video_frames()[:40]
        for i, image in enumerate(frames):
            agent._infer(Frame(i, time.time(), image), window)
        final = len(agent.model.early_exits)
        stats = window.close(time.time(), captured=40, dropped=0, elapsed_s=1.0)
        # Frames 0, 4, 8, ... went to full depth: at least those ten are final answers.
        assert stats.exit_histogram[final] >= 10 and sum(stats.exit_histogram) == 40
        counts = agent.collector.counts()
        assert counts["probed"] == 10 and counts["supplied"] == 0
        assert counts["nbytes"] > 0
        _, ex = agent.collector.examples(1, "pseudo", 0.0)
        head = agent.model.heads[agent.model.manifest.early_exits[1]]
        assert head is not None and head.weight is not None
        assert ex.x.shape == (10, head.weight.shape[1])
    finally:
        agent.outbox.close()


def test_federated_is_off_by_default(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, mqtt_broker: MosquittoBroker
) -> None:
    bundle, key = exits_bundle(tmp_path_factory)
    cfg = write_config(
        tmp_path, device_id="pi-plain", broker=mqtt_broker, bundle=bundle, key=key,
    )  # fmt: skip
    agent = Agent(load_config(cfg), threading.Event())
    try:
        assert agent.collector is None and agent.fed_worker is None
        assert agent.link.on_fed_task is None  # not even subscribed to rounds
    finally:
        agent.outbox.close()
