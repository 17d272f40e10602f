"""A guard against collapsed INT8 outputs: compare with fp32 on the validation split, say why.

Static quantization takes every activation range from the calibration split. Calibrated on
data unlike what the model sees later (blank frames, another domain, the wrong scaling), the
ranges are wrong and the INT8 model can still run, pass graph checks and even keep a
classifier's top class on some frames, while its outputs have collapsed: PP-OCRv4's text
detector calibrated on out-of-domain images gave probability maps peaking at 0.065 where fp32
gives 1.0. `compare_outputs` measures INT8 against fp32 on the same inputs with task-neutral
figures; `check_collapse` stops the run with those figures and the likely cause, found by
comparing the calibration and validation inputs' statistics (`input_stats`).

Pure numpy: the caller runs both models (batch 1, as devices do) and passes the outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import QuantizationCollapse

F64 = npt.NDArray[np.float64]

# Robust dynamic range: the spread between these percentiles of all output values, so a few
# outliers (one saturated pixel, one extreme logit) neither make nor hide a collapse.
RANGE_PERCENTILES = (0.1, 99.9)

# Collapse thresholds, none tuned to one model: each sits well outside what healthy INT8 gave
# here (static QDQ, minmax, calibrated on the model's own kind of data), and well inside what
# collapsed models gave. Healthy, measured on this stack (issue 16 report): the MNIST reference
# CNN cosine 0.9999 / SQNR 36.3 dB / range ratio 1.002 / top-1 1.000; the residual digits model
# 0.9992 / 28.2 dB / 1.006 / 1.000; PP-OCRv4 det (sigmoid maps) 0.985 / 15.2 dB / 1.000.
# Collapsed: the same calibrated on blank, saturated, noise or natural-photo frames: top-1
# 0.09-0.10, SQNR -18..4 dB, range ratio 0.00-0.42 or 3-7.
#
# Cosine < 0.9: the INT8 and fp32 output vectors are over 25 degrees apart; 8-bit rounding noise
# alone keeps cosine above 0.999.
MIN_COSINE = 0.9
# SQNR < 10 dB: the error carries a tenth of the signal's power (about 32% RMS error). 8-bit
# rounding alone gives ~40 dB; a healthy CNN's logits 28-36 dB; a near-binary probability map
# ~15 dB, where a few edge pixels flip between ~0 and ~1 (the lowest healthy figure seen).
MIN_SQNR_DB = 10.0
# Range ratio outside [0.5, 2]: the INT8 output spans under half, or over twice, the fp32
# spread. Cosine is blind to scale and a halved output still has 6 dB SQNR, so this is the
# figure for "right shape, wrong magnitude" (the PP-OCR case: maps peaking at 0.065 or 0.42,
# under the detector's 0.5 box threshold, so it finds nothing).
MIN_RANGE_RATIO = 0.5
MAX_RANGE_RATIO = 2.0
# Top-1 agreement < 0.5: INT8 picks another class than fp32 on most samples; healthy INT8
# agrees on 97-100%, so only class scores that no longer carry the class do this badly.
MIN_TOP1_AGREEMENT = 0.5

# Calibration unlike validation: a channel whose mean moved by more than half a standard
# deviation (the larger of the two splits'; a "medium" standardised difference, far beyond what
# two draws of one data set give: 0.02-0.03 between the digits model's splits), or whose standard
# deviation is off by more than 2x, or whose calibration spread covers under half the
# validation spread (minmax ranges then clip what the model meets).
MAX_MEAN_SHIFT_STD = 0.5
MAX_STD_RATIO = 2.0
MIN_SPREAD_COVER = 0.5
# Beneath this, a standard deviation is "none" (a blank or constant input): not a divisor.
_TINY = 1e-12


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class OutputSimilarity:
    """How close one INT8 output is to fp32's over the validation samples."""

    index: int
    cosine: float  # mean over samples of the cosine between flattened outputs
    sqnr_db: float  # 10 log10(sum fp32^2 / sum (fp32 - int8)^2); inf when identical
    fp32_range: float  # p99.9 - p0.1 of all fp32 values of this output
    quant_range: float
    range_ratio: float  # quant_range / fp32_range (1.0 when both are flat)

    def problems(self) -> list[str]:
        """The figures past their thresholds, each as 'name value (limit)'."""
        found = []
        if self.cosine < MIN_COSINE:
            found.append(f"cosine {self.cosine:.3f} (< {MIN_COSINE})")
        if self.sqnr_db < MIN_SQNR_DB:
            found.append(f"SQNR {self.sqnr_db:.1f} dB (< {MIN_SQNR_DB:g})")
        if not MIN_RANGE_RATIO <= self.range_ratio <= MAX_RANGE_RATIO:
            found.append(
                f"range ratio {self.range_ratio:.3f} (INT8 {self.quant_range:.3g} vs fp32 "
                f"{self.fp32_range:.3g}; outside {MIN_RANGE_RATIO}..{MAX_RANGE_RATIO:g})"
            )
        return found

    def to_report(self) -> dict[str, Any]:
        """JSON-ready figures (JSON has no infinity: an infinite SQNR or ratio is null)."""
        return {
            "output": self.index,
            "cosine": self.cosine,
            "sqnr_db": _finite(self.sqnr_db),
            "fp32_range": self.fp32_range,
            "int8_range": self.quant_range,
            "range_ratio": _finite(self.range_ratio),
        }


@dataclass(frozen=True)
class OutputAgreement:
    """INT8 against fp32 on N samples: per-output similarity, and top-1 for a classifier."""

    samples: int
    outputs: tuple[OutputSimilarity, ...]
    top1_agreement: float | None  # classifiers only: share of samples with the same arg-max
    # Classifiers only: the top-1 agreement a constant answer would get (the share of fp32's
    # most frequent class). At or above MIN_TOP1_AGREEMENT, top-1 cannot tell a collapsed
    # model from a good one (an untrained or one-class-heavy model), so the class scores are
    # then judged by the similarity figures too.
    top1_baseline: float | None = None

    def problems(self) -> list[str]:
        """Every figure past its threshold, prefixed with its output when there are several."""
        found = []
        if self.top1_agreement is not None and self.top1_agreement < MIN_TOP1_AGREEMENT:
            found.append(f"top-1 agreement {self.top1_agreement:.3f} (< {MIN_TOP1_AGREEMENT})")
        # The contract: class scores are judged by top-1 agreement (the accuracy budget
        # rules on the rest), other outputs by the task-neutral figures. Logits' cosine and SQNR
        # weigh the losing classes as much as the winner, which no classifier task does.
        top1_judges = self.top1_baseline is not None and self.top1_baseline < MIN_TOP1_AGREEMENT
        many = len(self.outputs) > 1
        for out in self.outputs:
            if out.index == 0 and top1_judges:
                continue
            found += [f"output {out.index} {p}" if many else p for p in out.problems()]
        return found

    def to_report(self) -> dict[str, Any]:
        """JSON-ready figures for the optimizer's report."""
        return {
            "samples": self.samples,
            "top1_agreement": self.top1_agreement,
            "top1_baseline": self.top1_baseline,
            "outputs": [o.to_report() for o in self.outputs],
            "thresholds": {
                "min_top1_agreement": MIN_TOP1_AGREEMENT,
                "min_cosine": MIN_COSINE,
                "min_sqnr_db": MIN_SQNR_DB,
                "range_ratio": [MIN_RANGE_RATIO, MAX_RANGE_RATIO],
            },
        }


def _per_sample(a: npt.ArrayLike) -> F64:
    arr = np.asarray(a, dtype=np.float64)
    return arr.reshape(arr.shape[0], -1) if arr.ndim else arr.reshape(1, 1)


def _cosine(a: F64, b: F64) -> float:
    """Mean over rows of the cosine; two all-zero rows agree (1), one all-zero row does not (0)."""
    dot = np.sum(a * b, axis=1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na <= _TINY) & (nb <= _TINY)
    denom = na * nb
    cos = np.where(denom > _TINY, dot / np.where(denom > _TINY, denom, 1.0), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cos)))


def _sqnr_db(ref: F64, got: F64) -> float:
    """Signal (fp32) power over error power in dB, pooled over all samples and elements."""
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:  # fp32 gives zeros and INT8 does not: no signal left at all
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _spread(a: F64) -> float:
    lo, hi = np.percentile(a, RANGE_PERCENTILES)
    return float(hi - lo)


def _similarity(index: int, ref: F64, got: F64) -> OutputSimilarity:
    r32, r8 = _spread(ref), _spread(got)
    # A constant fp32 output: agreeing means INT8 is constant too.
    flat_ratio = 1.0 if r8 <= _TINY else math.inf
    ratio = r8 / r32 if r32 > _TINY else flat_ratio
    return OutputSimilarity(
        index=index,
        cosine=_cosine(ref, got),
        sqnr_db=_sqnr_db(ref, got),
        fp32_range=r32,
        quant_range=r8,
        range_ratio=ratio,
    )


def compare_outputs(
    fp32: Sequence[npt.ArrayLike], quant: Sequence[npt.ArrayLike], *, classifier: bool
) -> OutputAgreement:
    """INT8 outputs against fp32's: one array per model output, each stacked over N samples.

    With `classifier`, the first output holds the class scores and top-1 agreement is computed
    on it (arg-max over all its non-batch elements), with the agreement a constant answer gets.
    """
    if len(fp32) != len(quant) or not fp32:
        raise ValueError(f"{len(fp32)} fp32 outputs but {len(quant)} INT8 outputs")
    refs = [_per_sample(a) for a in fp32]
    gots = [_per_sample(a) for a in quant]
    for i, (r, g) in enumerate(zip(refs, gots, strict=True)):
        if r.shape != g.shape:
            raise ValueError(f"output {i}: fp32 shape {r.shape} but INT8 shape {g.shape}")
    n = refs[0].shape[0]
    if n == 0 or any(r.shape[0] != n for r in refs):
        raise ValueError("every output needs the same, non-zero number of samples")
    top1 = baseline = None
    if classifier:
        ref_top = np.argmax(refs[0], axis=1)
        top1 = float(np.mean(ref_top == np.argmax(gots[0], axis=1)))
        baseline = float(np.max(np.bincount(ref_top)) / n)
    sims = tuple(_similarity(i, r, g) for i, (r, g) in enumerate(zip(refs, gots, strict=True)))
    return OutputAgreement(samples=n, outputs=sims, top1_agreement=top1, top1_baseline=baseline)


@dataclass(frozen=True)
class InputStats:
    """Per-channel statistics of preprocessed inputs (channel = axis 1; one channel if 2-D)."""

    samples: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...]  # p0.1 per channel
    high: tuple[float, ...]  # p99.9 per channel

    def to_report(self) -> dict[str, Any]:
        """JSON-ready statistics."""
        return {
            "samples": self.samples,
            "mean": list(self.mean),
            "std": list(self.std),
            "p0.1": list(self.low),
            "p99.9": list(self.high),
        }


def input_stats(x: npt.ArrayLike) -> InputStats:
    """Mean, standard deviation and robust range of each channel of a batch (N, C, ...)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"input_stats needs a non-empty batch (N, ...), got shape {arr.shape}")
    # (C, everything else): images are NCHW after the optimizer's preprocessing.
    chans = np.moveaxis(arr, 1, 0).reshape(arr.shape[1], -1) if arr.ndim > 2 else arr.reshape(1, -1)
    lo, hi = np.percentile(chans, RANGE_PERCENTILES, axis=1)
    return InputStats(
        samples=int(arr.shape[0]),
        mean=tuple(float(v) for v in chans.mean(axis=1)),
        std=tuple(float(v) for v in chans.std(axis=1)),
        low=tuple(float(v) for v in lo),
        high=tuple(float(v) for v in hi),
    )


def _num(v: float) -> str:
    """Three significant digits, and never '-0' (a blank channel's mean can be -0.0)."""
    return f"{v + 0.0:.3g}"


def input_differences(calib: InputStats, val: InputStats) -> list[str]:
    """How the calibration inputs differ from the validation inputs, per channel (empty: alike).

    A channel differs when its mean moved by more than half a validation standard deviation,
    its standard deviation is off by more than 2x, or the calibration spread covers under half
    of the validation spread: each one means calibrated activation ranges that do not fit.
    """
    if len(calib.mean) != len(val.mean):
        return [f"{len(calib.mean)} channels vs {len(val.mean)}"]
    found = []
    for c in range(len(val.mean)):
        why = []
        m_c, m_v, s_c, s_v = calib.mean[c], val.mean[c], calib.std[c], val.std[c]
        shift = abs(m_c - m_v) / max(s_v, s_c, _TINY)
        if shift > MAX_MEAN_SHIFT_STD:
            why.append(f"mean {_num(m_c)} vs {_num(m_v)}")
        if max(s_c, s_v) > _TINY and not (
            1 / MAX_STD_RATIO <= s_c / max(s_v, _TINY) <= MAX_STD_RATIO
        ):
            why.append(f"std {_num(s_c)} vs {_num(s_v)}")
        v_lo, v_hi = val.low[c], val.high[c]
        covered = max(0.0, min(calib.high[c], v_hi) - max(calib.low[c], v_lo))
        if v_hi - v_lo > _TINY and covered / (v_hi - v_lo) < MIN_SPREAD_COVER:
            why.append(
                f"range {_num(calib.low[c])}..{_num(calib.high[c])} vs {_num(v_lo)}..{_num(v_hi)}"
            )
        if why:
            found.append(f"channel {c} " + ", ".join(why))
    return found


def check_collapse(
    agreement: OutputAgreement, *, calib_stats: InputStats, val_stats: InputStats
) -> None:
    """Raise QuantizationCollapse, one line with the figures and the likely cause, on collapse."""
    problems = agreement.problems()
    if not problems:
        return
    diffs = input_differences(calib_stats, val_stats)
    if diffs:
        # Two channels say enough (an RGB image's channels usually move together).
        more = f"; {len(diffs) - 2} more channel(s)" if len(diffs) > 2 else ""
        cause = (
            "calibration data unlike the validation data (calibration vs validation: "
            f"{'; '.join(diffs[:2])}{more}): calibrate on images like those the model will see"
        )
    else:
        cause = (
            "calibration and validation inputs look alike, so an op whose INT8 form is broken "
            "on this model: try --calibration percentile or entropy, or keep that layer in float"
        )
    raise QuantizationCollapse(
        f"INT8 outputs collapsed against fp32 on {agreement.samples} validation samples: "
        f"{', '.join(problems)}; likely cause: {cause}"
    )
