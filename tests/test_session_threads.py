"""Thread counts per session and execution providers by probe, on a real optimizer bundle.

Predictions must not depend on how many threads a session runs on (stages on `threads`,
exit branches on one, stages by probe): checked bit for bit on reference test images. The
provider probe runs for real on this machine's onnxruntime wheel, which has the CPU (and
Azure) providers only, so it must keep CPU; the pure choosers are checked on given timings.
No test depends on the machine's speed: probes are checked for what they return, never for
which thread count or provider is faster here.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnxruntime as ort
import pytest

import edgefleet.agent.runtime.staged as staged_module
from edgefleet.agent.bundle import Preprocessing, VerifiedBundle, verify_bundle
from edgefleet.agent.runtime.preprocess import Preprocessor
from edgefleet.agent.runtime.providers import (
    CPU,
    candidate_providers,
    choose_fastest,
    probe_providers,
)
from edgefleet.agent.runtime.session import (
    EXIT_BRANCH_THREADS,
    blank_feeds,
    choose_threads,
    prefer_unless_faster,
    probe,
    probe_threads,
    session_options,
)
from edgefleet.agent.runtime.staged import StagedModel
from edgefleet.server.keystore import FleetKey, init_key
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.optimize.options import OptimizeOptions
from edgefleet.server.optimize.pipeline import optimize
from edgefleet.server.reference import MODEL_PATH, load_reference_split

SPEC = Preprocessing(height=64, width=64, color="GRAY", mean=[0.1307], std=[0.3081])
IMAGES = 300  # test images compared bit for bit (every exit is taken by some of them)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[VerifiedBundle, list[np.ndarray]]:
    """The optimizer's bundle of the reference CNN, and preprocessed test images."""
    work = tmp_path_factory.mktemp("threads")
    splits = load_reference_split()
    npz = write_splits_npz(splits, work / "mnist.npz")
    key: FleetKey = init_key(work / "keys")[0]
    out = work / "opt"
    optimize(
        MODEL_PATH,
        npz,
        out,
        SPEC,
        key,
        OptimizeOptions(latency_samples=10),
        progress=lambda _m: None,
    )
    verified = verify_bundle(out / "bundle", [key.public])
    batch = Preprocessor(SPEC).batch(list(splits["test"][0][:IMAGES]))
    images = [np.asarray(batch[i : i + 1], np.float32) for i in range(IMAGES)]
    return verified, images


def _outputs(model: StagedModel, images: list[np.ndarray]) -> list[tuple[int, int, object]]:
    """(class, exit, exact probability or logits) per image at the default point."""
    result: list[tuple[int, int, object]] = []
    for x in images:
        p = model.predict(x)
        result.append((p.class_index, p.exit_index, p.logits if p.logits else p.top1))
    return result


def test_exit_branches_run_on_one_thread_stages_on_the_configured_count(
    reference: tuple[VerifiedBundle, list[np.ndarray]],
) -> None:
    verified, _ = reference
    model = StagedModel(verified, threads=2)
    assert model.stage_threads == [2] * len(model.sessions)
    has_branch = [b is not None for b in model.branches]
    assert any(has_branch), "the reference bundle has exit branch graphs"
    assert model.branch_threads == [EXIT_BRANCH_THREADS if b else None for b in has_branch]
    assert EXIT_BRANCH_THREADS == 1
    probed = StagedModel(verified, threads=2, thread_probe=True)
    assert all(n in (1, 2) for n in probed.stage_threads)


def test_thread_counts_do_not_change_predictions(
    reference: tuple[VerifiedBundle, list[np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    verified, images = reference
    one = StagedModel(verified, threads=1)
    two = StagedModel(verified, threads=2)
    probed = StagedModel(verified, threads=2, thread_probe=True)
    monkeypatch.setattr(staged_module, "EXIT_BRANCH_THREADS", 2)  # the former setup
    all_two = StagedModel(verified, threads=2)
    assert all_two.branch_threads != two.branch_threads
    expected = _outputs(one, images)
    assert len({e for _, e, _ in expected}) == len(one.early_exits) + 1, "every exit taken"
    for model in (two, probed, all_two):
        assert _outputs(model, images) == expected
    for x in images[:30]:  # every exit's logits, not only the exit taken (batch of 1: static)
        want = one.all_exit_logits(x)
        for model in (two, probed, all_two):
            for a, b in zip(model.all_exit_logits(x), want, strict=True):
                assert np.array_equal(a, b)


def test_probe_threads_returns_a_session_of_either_count_with_timings(
    reference: tuple[VerifiedBundle, list[np.ndarray]],
) -> None:
    verified, _ = reference
    data = verified.read(verified.manifest.stages[0].file)
    made: list[int] = []

    def make(n: int) -> ort.InferenceSession:
        made.append(n)
        return ort.InferenceSession(data, session_options(n), providers=[CPU])

    sess, chosen, timings = probe_threads(make, 2, runs=6)
    assert sorted(made) == [1, 2] and sorted(timings) == [1, 2]
    assert chosen in (1, 2) and all(t > 0 for t in timings.values())
    assert sess.run(None, blank_feeds(sess))  # the kept session runs
    single, n, none = probe_threads(make, 1)
    assert n == 1 and none == {} and made[-1] == 1
    assert single.run(None, blank_feeds(single))


def test_blank_feeds_fill_dynamic_dims_with_one() -> None:
    sess = ort.InferenceSession(str(MODEL_PATH), providers=[CPU])
    feeds = blank_feeds(sess)
    (arg,) = sess.get_inputs()
    value = feeds[arg.name]
    assert value.dtype == np.float32 and not value.any()
    assert [d if isinstance(d, int) else 1 for d in arg.shape] == list(value.shape)


def test_auto_provider_probe_keeps_cpu_on_this_wheel(
    reference: tuple[VerifiedBundle, list[np.ndarray]],
) -> None:
    verified, images = reference
    assert set(ort.get_available_providers()) <= {CPU, "AzureExecutionProvider"}, (
        "this test describes a CPU-only wheel"
    )
    assert candidate_providers() == [CPU]  # Azure is never a candidate
    auto = StagedModel(verified, threads=1, providers=["auto"])
    assert auto.providers == [CPU]
    assert auto.sessions[0].get_providers() == [CPU]
    plain = StagedModel(verified, threads=1)
    assert _outputs(auto, images[:20]) == _outputs(plain, images[:20])


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_provider_probe_skips_a_provider_that_cannot_build(
    reference: tuple[VerifiedBundle, list[np.ndarray]], caplog: pytest.LogCaptureFixture
) -> None:
    verified, _ = reference
    data = verified.read(verified.manifest.stages[0].file)

    def build(provider: str) -> ort.InferenceSession:
        # onnxruntime itself refuses a provider name it does not know
        return ort.InferenceSession(data, session_options(1), providers=[provider])

    def run(sess: ort.InferenceSession) -> object:
        return sess.run(None, blank_feeds(sess))

    # onnxruntime falls back to the CPU provider for a name it does not know (with a warning
    # of its own): the probe must see that and skip the candidate, not time CPU under its name
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.runtime.providers"):
        choice = probe_providers(
            build,
            run,
            candidates=["NoSuchExecutionProvider"],
            active=lambda sess: sess.get_providers(),
            runs=4,
        )
    assert choice.provider == CPU and set(choice.timings_ms) == {CPU}
    assert choice.timings_ms[CPU] > 0
    assert list(choice.skipped) == ["NoSuchExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records if "NoSuchExecutionProvider" in r.getMessage()]
    assert len(lines) == 1 and "skipped" in lines[0]
    assert choice.model.get_providers() == [CPU]


def test_candidate_providers_keep_known_ones_and_always_cpu() -> None:
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", CPU]
    assert candidate_providers(have) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert candidate_providers(["XnnpackExecutionProvider"]) == ["XnnpackExecutionProvider", CPU]
    assert candidate_providers([]) == [CPU]


def test_choose_fastest_prefers_cpu_unless_another_wins_by_the_margin() -> None:
    assert choose_fastest({CPU: 10.0}, 0.1) == CPU
    assert choose_fastest({CPU: 10.0, "XnnpackExecutionProvider": 9.5}, 0.1) == CPU
    assert choose_fastest({CPU: 10.0, "XnnpackExecutionProvider": 8.9}, 0.1) == (
        "XnnpackExecutionProvider"
    )
    assert choose_fastest({CPU: 10.0, "XnnpackExecutionProvider": 9.5}, 0.0) == (
        "XnnpackExecutionProvider"
    )
    timings = {CPU: 10.0, "CUDAExecutionProvider": 5.0, "TensorrtExecutionProvider": 2.0}
    assert choose_fastest(timings, 0.1) == "TensorrtExecutionProvider"
    assert choose_fastest({CPU: 1.0, "CUDAExecutionProvider": 3.0}, 0.1) == CPU
    with pytest.raises(ValueError, match="no timing"):
        choose_fastest({"CUDAExecutionProvider": 1.0}, 0.1)
    with pytest.raises(ValueError, match="margin"):
        choose_fastest({CPU: 1.0}, 1.0)


def test_choose_threads_prefers_fewer_unless_more_win_by_the_margin() -> None:
    assert choose_threads({1: 1.0, 2: 0.95}) == 1
    assert choose_threads({1: 1.0, 2: 0.6}) == 2
    assert choose_threads({1: 1.0, 2: 0.7, 4: 0.5}) == 4
    assert choose_threads({1: 0.5, 2: 1.0}) == 1
    assert choose_threads({2: 1.0}) == 2
    assert prefer_unless_faster({"a": 1.0, "b": 0.5}, "a", 0.6) == "a"


def test_probe_alternates_candidates_and_keeps_each_ones_fastest_run() -> None:
    calls: list[str] = []
    # Each run takes the next duration: a burst hits "b" once, "a" never.
    durations = itertools.cycle([0.002, 0.001, 0.002, 0.009, 0.002, 0.001])
    now = [0.0]

    def clock() -> float:
        return now[0]

    def run(name: str) -> None:
        calls.append(name)
        now[0] += next(durations)

    timings = probe({"a": "a", "b": "b"}, run, runs=3, warmup=1, clock=clock)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert timings == pytest.approx({"a": 2.0, "b": 1.0})


def test_probe_stops_at_its_time_budget_after_the_minimum_runs() -> None:
    now = [0.0]

    def run(_name: str) -> None:
        now[0] += 1.0  # a second per run: the budget is spent at once

    counts: dict[str, int] = {}

    def counted(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1
        run(name)

    probe({"a": "a"}, counted, runs=40, warmup=0, budget_s=0.5, clock=lambda: now[0])
    assert counts == {"a": 5}  # PROBE_MIN_RUNS
