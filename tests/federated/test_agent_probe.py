"""StagedModel.probe_frame: a frame at full depth gives each early exit's features and the
final head's prediction, the same numbers the batch path computes."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.federated import HeadWeights

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
