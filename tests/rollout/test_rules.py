"""Halt rules: parsing, pooling the canaries' windows, and the verdict."""

from __future__ import annotations

import pytest

from edgefleet.agent.protocol import Percentiles, Telemetry
from edgefleet.server.rollout.rules import (
    METRICS,
    HaltRule,
    RuleError,
    evaluate,
    parse_rule,
    parse_rules,
    pooled,
)


def window(
    device: str,
    seq: int,
    *,
    p95: float = 20.0,
    frames: int = 100,
    seconds: float = 10.0,
    histogram: list[int] | None = None,
    power_w: float | None = 5.0,
    dropped: int = 0,
) -> Telemetry:
    return Telemetry(
        device_id=device,
        seq=seq,
        window_start=1000.0 + 10 * seq,
        window_end=1000.0 + 10 * seq + seconds,
        frames_captured=frames + dropped,
        frames_processed=frames,
        frames_dropped=dropped,
        fps=frames / seconds,
        latency_ms=Percentiles(p50=min(p95, 5.0), p95=p95, p99=p95 + 1),
        exit_histogram=histogram if histogram is not None else [frames // 4, frames - frames // 4],
        operating_point=0,
        cpu_percent=100.0,
        rss_mb=100.0,
        temperature_c=50.0,
        power_w=power_w,
        power_source="estimate" if power_w is not None else "none",
        energy_per_frame_mj=None,
        outbox_depth=0,
        outbox_overflow=0,
    )


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("p95_ms>40", HaltRule("p95_ms", ">", 40.0)),
        (" fps < 12.5 ", HaltRule("fps", "<", 12.5)),
        ("error_rate>=0.01", HaltRule("error_rate", ">=", 0.01)),
        ("exit_rate<=0.2", HaltRule("exit_rate", "<=", 0.2)),
        ("p95_ms>1.5x", HaltRule("p95_ms", ">", 1.5, relative=True)),
        ("power_w>=1.2X", HaltRule("power_w", ">=", 1.2, relative=True)),
    ],
)
def test_parse_rule_reads_absolute_and_relative_forms(text: str, rule: HaltRule) -> None:
    assert parse_rule(text) == rule
    assert parse_rule(rule.text) == rule


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("latency>40", "unknown metric 'latency'"),
        ("p95_ms=40", "expected METRIC OP NUMBER"),
        ("p95_ms>>40", "is not a number"),
        ("p95_ms>forty", "'forty' is not a number"),
        ("p95_ms>inf", "finite"),
        ("p95_ms>0x", "above 0"),
        ("", "expected METRIC OP NUMBER"),
    ],
)
def test_bad_rules_name_the_problem_the_form_and_the_metrics(text: str, says: str) -> None:
    with pytest.raises(RuleError) as err:
        parse_rule(text)
    message = str(err.value)
    assert says in message
    assert "p95_ms>40" in message  # the expected form, by example
    if "unknown metric" in says or "expected" in says:
        assert all(m in message for m in METRICS)


def test_evaluate_pools_windows_by_frames_and_names_the_breach() -> None:
    # Device a: 300 frames at p95 60; device b: 100 frames at p95 20 -> (18000+2000)/400 = 50.
    after = [
        window("a", 1, p95=60, frames=150),
        window("a", 2, p95=60, frames=150),
        window("b", 1, p95=20, frames=100),
    ]
    verdict = evaluate(parse_rules(["p95_ms>40", "fps<5"]), after, [], error_events=0)
    assert verdict.state == "breached"
    (breach,) = verdict.breaches
    assert breach.rule.metric == "p95_ms" and breach.value == pytest.approx(50.0)
    assert verdict.values["p95_ms"] == pytest.approx(50.0)
    # 400 frames over 30 window seconds.
    assert verdict.values["fps"] == pytest.approx(400 / 30)
    assert verdict.reason == "p95_ms 50 > 40 over 3 windows from 2 canaries"
    assert (verdict.windows, verdict.devices) == (3, 2)


def test_evaluate_ok_when_no_rule_holds() -> None:
    after = [window("a", 1, p95=30), window("a", 2, p95=35)]
    verdict = evaluate([parse_rule("p95_ms>40")], after, [], error_events=0)
    assert verdict.state == "ok" and verdict.breaches == ()
    assert verdict.reason == "p95_ms 32.5 over 2 windows from 1 canary"


def test_too_few_windows_is_insufficient_not_ok() -> None:
    verdict = evaluate([parse_rule("p95_ms>40")], [window("a", 1, p95=99)], [], 0, min_windows=2)
    assert verdict.state == "insufficient"
    assert "need 2" in verdict.reason


def test_relative_rule_compares_with_the_baseline_before_the_install() -> None:
    before = [window("a", 1, p95=20), window("b", 1, p95=20)]
    slower = [window("a", 5, p95=35), window("b", 5, p95=35)]
    rule = parse_rule("p95_ms>1.5x")
    verdict = evaluate([rule], slower, before, 0)
    assert verdict.state == "breached"
    (b,) = verdict.breaches
    assert (b.value, b.baseline, b.limit) == (35.0, 20.0, 30.0)
    assert "1.5x baseline 20 (= 30)" in verdict.reason
    assert evaluate([rule], [window("a", 5, p95=29), window("b", 5, p95=29)], before, 0).state == (
        "ok"
    )
    # No baseline: the rule cannot be judged yet.
    assert evaluate([rule], slower, [], 0).state == "insufficient"


def test_rates_exit_error_and_dropped() -> None:
    ws = [
        window("a", 1, frames=100, histogram=[30, 70], dropped=10),
        window("a", 2, frames=100, histogram=[10, 90], dropped=30),
    ]
    assert pooled("exit_rate", ws) == pytest.approx(40 / 200)
    assert pooled("dropped_rate", ws) == pytest.approx(40 / 240)
    assert pooled("error_rate", ws, error_events=3) == pytest.approx(3 / 200)
    verdict = evaluate([parse_rule("error_rate>0.01")], ws, [], error_events=3)
    assert verdict.state == "breached"
    # A plain model (one exit) never exits early.
    assert pooled("exit_rate", [window("a", 1, histogram=[100])]) == 0.0


def test_a_breach_wins_over_an_unmeasured_metric_and_missing_power_is_insufficient() -> None:
    ws = [window("a", 1, p95=90, power_w=None), window("a", 2, p95=90, power_w=None)]
    only_power = evaluate([parse_rule("power_w>3")], ws, [], 0)
    assert only_power.state == "insufficient" and "no power_w measured" in only_power.reason
    both = evaluate(parse_rules(["power_w>3", "p95_ms>40"]), ws, [], 0)
    assert both.state == "breached"


def test_windows_without_frames_weigh_nothing() -> None:
    ws = [window("a", 1, p95=10, frames=100), window("a", 2, p95=0, frames=0, histogram=[0, 0])]
    assert pooled("p95_ms", ws) == 10.0
    assert pooled("p95_ms", [window("a", 2, p95=0, frames=0, histogram=[0, 0])]) is None


def test_relative_error_rate_uses_the_errors_before_the_install() -> None:
    before = [window("a", 1), window("a", 2)]  # 200 frames
    after = [window("a", 3), window("a", 4)]  # 200 frames
    rule = parse_rule("error_rate>2x")
    assert evaluate([rule], after, before, 5, error_events_before=2).state == "breached"
    assert evaluate([rule], after, before, 3, error_events_before=2).state == "ok"
    assert evaluate([rule], after, before, 3).state == "insufficient"  # no baseline errors
