"""The closed loop on a fleet: how fast every group reaches its latency target, how often a
device is changed on the way, and how much accuracy the loop gives up against an oracle.

    python -m bench.closedloop [--devices 200] [--timeout 600] [--out out/bench/closedloop.json]

One run, on loopback: a mosquitto broker, the coordinator (SQLite store, catalogue, rollout
engine, closed loop), the catalogue's reference model built by the coordinator's own build jobs
into three variants (fp32; INT8; INT8 with early exits and its operating points), `--devices`
simulated devices in four device classes of different speeds (rpi5 1x, rpi4 2.5x, Jetson Orin
Nano 0.6x, x86 N100 0.4x the latency) spread over four groups with different targets, and one
real agent on the reference video in a group of its own.

Simulated devices run each variant at its cost on this machine (the optimizer's latency with
every exit disabled, times the point's share of the MACs) scaled so that fp32 takes 30 ms on a
Pi 5, times their class's speed: what real devices of those classes would see, up to the
scale. Every device starts on fp32, the most accurate and slowest variant.

Figures (medians and maxima over devices; the time is wall time on a loaded 2-core machine):
- time_to_target_s: per group, from its first window over target to the end of the last
  window at which any of its devices was out of target (the median of its last 5 windows'
  p95 over it: a device whose p95 sits just under a target has a window over it now and
  then); the top-level figure is the slowest group;
- out_of_target_windows_per_device: windows over target per device, mean and max;
- changes_per_device: configuration changes (variant or point) seen in each device's telemetry,
  mean and max; more than two in a run would be flapping;
- accuracy_gap_vs_oracle_pt: per device, validation accuracy of the most accurate configuration
  whose true p95 on its class meets the target (the oracle, from the catalogue and the simulated
  speeds) minus that of the configuration it ended on, in points; mean and max;
- prediction errors of the loop's latency predictions once measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import emit_report, load_avg, machine_info, report_head, say
from edgefleet.agent.protocol import Telemetry
from edgefleet.server.catalogue.client import CatalogueClient
from edgefleet.server.catalogue.options import ModelOptions
from edgefleet.server.catalogue.upload import pack_model
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.fleet.simulate.variants import CLASS_SPEED, SimVariant
from edgefleet.server.fleet.store.catalogue_base import VariantRecord
from edgefleet.server.keystore import PRIVATE_NAME, init_key
from edgefleet.server.local.agents import AgentProcess, write_config
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from edgefleet.server.optimize.data import write_splits_npz
from edgefleet.server.reference import MODEL_PATH, load_reference_split
from edgefleet.server.retune.catalogue_view import CatalogueView
from edgefleet.server.retune.client import LoopClient
from edgefleet.server.retune.config import LoopConfig
from edgefleet.server.retune.engine import CALIBRATION_WINDOWS
from edgefleet.server.retune.latency import Config

TOKEN = "closedloop-bench"
FP32_RPI5_MS = 30.0  # the scale: fp32 runs 30 ms (p50) on a Pi 5
P95_OVER_P50 = 1.3  # what the simulated devices report
# Group -> p95 target (ms). With the speeds above the oracle differs by group and by class.
TARGETS = {"north": 60.0, "south": 25.0, "east": 12.0, "west": 120.0}
MIN_ACCURACY = 0.95
REAL_GROUP = "real"
# The real agent's target against its settled fp32 p95: low enough that fp32 windows miss it,
# high enough that INT8 with exits meets it on a CPU where INT8 convolutions gain nothing
# (0.7 timed out once on a no-VNNI EPYC: the exits left ~0.7x of fp32 end to end there).
REAL_SHARE = 0.8
MET_WINDOWS = 5
VARIANTS = {
    "fp32": {"quantization": "none", "exits": "none"},
    "int8": {"exits": "none"},
    "int8-exits": {},
}
LOOP = LoopConfig(
    tick_s=1.0, miss_windows=3, under_windows=6, cooldown_s=10.0, canary="10%", soak_s=5.0,
    pin_timeout_s=30.0, build=True,
)


def _build_catalogue(client: CatalogueClient, work: Path) -> dict[str, str]:
    """models add + one build per variant through the coordinator's jobs; name -> variant id."""
    data = write_splits_npz(load_reference_split(), work / "mnist.npz")
    options = ModelOptions(mean=[0.1307], std=[0.3081], model_id="mnist")
    client.add_model("mnist", pack_model(MODEL_PATH, data, options))
    built: dict[str, str] = {}
    for name, opts in VARIANTS.items():
        job = client.build("mnist", opts)
        say(f"building {name}: job {job.job_id}")
        def finished(job_id: str = job.job_id) -> bool:
            return client.job(job_id).state in ("succeeded", "failed", "cancelled")

        wait_until(finished, 900, f"build {name}")
        done = client.job(job.job_id)
        if done.state != "succeeded" or done.variant_id is None:
            raise RuntimeError(f"build {name} {done.state}: {done.reason}")
        built[name] = done.variant_id
    return built


def _sim_variants(view: CatalogueView, variants: list[VariantRecord]) -> list[SimVariant]:
    """Each variant at its cost on this machine, scaled so fp32 takes FP32_RPI5_MS on a Pi 5."""
    fp32 = max(variants, key=lambda v: view.costs.get(Config(v.manifest_sha256, 0), 0.0))
    scale = FP32_RPI5_MS / view.costs[Config(fp32.manifest_sha256, fp32.default_point)]
    out = []
    for v in variants:
        n = sum(1 for c in view.costs if c.manifest == v.manifest_sha256)
        ms = tuple(view.costs[Config(v.manifest_sha256, i)] * scale for i in range(n))
        out.append(SimVariant(v.manifest_sha256, v.model_id, v.version, ms, v.default_point))
    return out


def _oracle(
    view: CatalogueView, sims: dict[str, SimVariant], cls: str, target: float
) -> tuple[float, Config]:
    """The most accurate configuration whose true p95 on cls meets target (else the fastest)."""
    rows = []
    for manifest, sv in sims.items():
        for i, ms in enumerate(sv.point_ms):
            acc = view.accuracy.get(Config(manifest, i))
            if acc is None or acc < MIN_ACCURACY:
                continue
            rows.append((acc, ms * CLASS_SPEED[cls] * P95_OVER_P50, Config(manifest, i)))
    fitting = [r for r in rows if r[1] <= target]
    best = max(fitting, key=lambda r: (r[0], -r[1])) if fitting else min(rows, key=lambda r: r[1])
    return best[0], best[2]


def _windows(coord: Coordinator, device_id: str) -> list[Telemetry]:
    return sorted(
        (r.telemetry for r in coord.store.telemetry(device_id, limit=100_000)),
        key=lambda t: t.seq,
    )


def _met(coord: Coordinator, devices: list[str], target: float) -> bool:
    """Every device's median p95 over its last MET_WINDOWS windows is at most target."""
    for d in devices:
        recent = [r.telemetry.latency_ms.p95 for r in coord.store.telemetry(d, limit=MET_WINDOWS)]
        if len(recent) < MET_WINDOWS or statistics.median(recent) > target:
            return False
    return True


def _device_figures(
    coord: Coordinator, device: str, target: float, since: float
) -> tuple[int, int, float | None, float | None]:
    """Windows over target, configuration changes, first miss start, last miss end."""
    ws = [t for t in _windows(coord, device) if t.window_end >= since]
    misses = [t for t in ws if t.latency_ms.p95 > target]
    configs = [(t.model_version, t.operating_point) for t in ws]
    changes = sum(1 for a, b in itertools.pairwise(configs) if a != b)
    # Out of target: the median of the last MET_WINDOWS windows over it. A p95 target is a
    # statistic too: a device whose p95 sits just under it has a window over it now and then.
    out = [
        ws[i] for i in range(len(ws))
        if statistics.median(t.latency_ms.p95 for t in ws[max(0, i - MET_WINDOWS + 1) : i + 1])
        > target
    ]
    if not misses:
        return 0, changes, None, None
    end = out[-1].window_end if out else misses[0].window_end
    return len(misses), changes, misses[0].window_start, end


def _group_figures(
    coord: Coordinator, devices: list[str], target: float, since: float
) -> tuple[dict[str, Any], list[int], list[int]]:
    rows = [_device_figures(coord, d, target, since) for d in devices]
    over = [r[0] for r in rows]
    changes = [r[1] for r in rows]
    starts = [r[2] for r in rows if r[2] is not None]
    ends = [r[3] for r in rows if r[3] is not None]
    figures = {
        "devices": len(devices),
        "target_p95_ms": round(target, 3),
        "time_to_target_s": round(max(ends) - min(starts), 1) if starts else 0.0,
        "out_of_target_windows": {"mean": round(statistics.mean(over), 2), "max": max(over)},
        "changes": {"mean": round(statistics.mean(changes), 3), "max": max(changes)},
    }
    return figures, over, changes


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    broker = MosquittoBroker(work / "broker")
    broker.start()
    key, _ = init_key(work / "keys")
    coord = Coordinator(
        CoordinatorConfig(
            store=f"sqlite:///{work / 'coordinator' / 'fleet.db'}",
            mqtt=IngestConfig(host=broker.host, port=broker.port),
            http_port=0,
            token=TOKEN,
            fleet_keys=[key.public_path],
            signing_key=key.directory / PRIVATE_NAME,
            rollout_tick_s=0.5,
            state_dir=work / "coordinator",
            loop=LOOP,
        )
    )
    (work / "coordinator").mkdir(parents=True, exist_ok=True)
    sims: list[Simulator] = []
    agent: AgentProcess | None = None
    coord.start()
    try:
        client = CatalogueClient(coord.url, TOKEN)
        loop = LoopClient(coord.url, TOKEN)
        t0 = time.monotonic()
        built = _build_catalogue(client, work)
        build_s = time.monotonic() - t0
        records = [coord.store.variant(v) for v in built.values()]
        variants = [v for v in records if v is not None]
        view = CatalogueView.of(variants)
        sim_variants = _sim_variants(view, variants)
        by_manifest = {s.manifest_sha256: s for s in sim_variants}
        fp32 = coord.store.variant(built["fp32"])
        assert fp32 is not None
        for group, target in TARGETS.items():
            loop.set_target(group, {"p95_ms": target, "min_accuracy": MIN_ACCURACY})
        started = time.time()
        per_group = max(1, args.devices // len(TARGETS))
        members: dict[str, list[str]] = {}
        for g, group in enumerate(TARGETS):
            sim = Simulator(
                SimConfig(
                    host=broker.host, port=broker.port, devices=per_group, rate=args.rate,
                    group=group, prefix="sim", first_index=g * per_group, events_every=0,
                    variants=tuple(sim_variants), initial_variant=fp32.manifest_sha256,
                    install_s=2.0, seed=g,
                )
            )
            sim.start()
            sims.append(sim)
            members[group] = sim.device_ids()
        say(f"{per_group * len(TARGETS)} simulated devices in {len(TARGETS)} groups started")
        bundle = work / "fp32-bundle"
        _unpack_variant(coord, fp32, bundle)
        cfg = write_config(work / "agent", device_id="real-0", broker=broker, bundle=bundle,
                           key=key, group=REAL_GROUP)
        agent = AgentProcess(cfg, work / "agent.log")
        members[REAL_GROUP] = ["real-0"]
        real_target = _real_target(coord, loop, fp32, args.timeout)
        say(f"real agent: target {real_target:.3f} ms ({REAL_SHARE:g} x its settled fp32 p95)")
        targets = {**TARGETS, REAL_GROUP: real_target}

        def all_met() -> bool:
            return all(_met(coord, members[g], t) for g, t in targets.items())

        wait_until(all_met, args.timeout, "every group meeting its target",
                   poll=2.0, detail=lambda: _state(coord, targets))
        met_s = time.time() - started
        say(f"every group meets its target after {met_s:.0f} s; watching {args.settle:g} s more")
        time.sleep(args.settle)
        still = all_met()
        return _report(coord, view, by_manifest, members, targets, started, build_s, met_s, still)
    finally:
        for sim in sims:
            sim.stop(graceful=False)
        if agent is not None:
            agent.terminate(5)
        coord.stop()
        broker.stop()


def _unpack_variant(coord: Coordinator, v: VariantRecord, out: Path) -> None:
    from edgefleet.agent.bundle import unpack

    info = coord.archives.get(v.bundle_sha256)
    assert info is not None
    unpack(info.path, out)


def _real_target(
    coord: Coordinator, loop: LoopClient, fp32: VariantRecord, timeout: float
) -> float:
    """REAL_SHARE x the real agent's fp32 p95, once settled: it misses on fp32, and the INT8
    variants meet it (2-3x faster in compute; at well under a millisecond a frame the runtime's
    fixed costs leave INT8 with early exits at about 0.55-0.7 x fp32 end to end).

    The first windows after the start (the calibration the loop keeps) can run slower than
    the agent's steady state while simulated devices start beside it: measured here, 14.4 ms
    calibrated against under 10 ms a few windows later. A target taken from those would be met
    on fp32 and nothing would have to move, so the target is REAL_SHARE x the smaller of the
    calibration and the median of the agent's last MET_WINDOWS windows, after the loop's own
    calibration is complete."""
    def calibrated() -> float | None:
        for r in coord.store.latencies(fp32.manifest_sha256):
            dev = coord.store.device("real-0")
            cls = dev.status.hardware.device_class if dev and dev.status else None
            if r.device_class == cls and r.windows >= CALIBRATION_WINDOWS:
                return r.p95_ms
        return None

    loop.set_target(REAL_GROUP, {"p95_ms": 1000.0, "min_accuracy": MIN_ACCURACY})
    wait_until(lambda: calibrated() is not None, timeout, "the real agent's fp32 calibration")

    def settled() -> float | None:
        recent = coord.store.telemetry("real-0", limit=CALIBRATION_WINDOWS + MET_WINDOWS)
        if len(recent) < CALIBRATION_WINDOWS + MET_WINDOWS:
            return None
        return statistics.median(r.telemetry.latency_ms.p95 for r in recent[:MET_WINDOWS])

    wait_until(lambda: settled() is not None, timeout, "the real agent's settled fp32 windows")
    target = REAL_SHARE * min(calibrated() or 0.0, settled() or 0.0)
    loop.set_target(REAL_GROUP, {"p95_ms": target})
    return target


def _state(coord: Coordinator, targets: dict[str, float]) -> str:
    lines = []
    for g, t in targets.items():
        status = coord.retune.status.get(g)
        if status is not None:
            lines.append(f"{g}: target {t:.2f}: {status.out_of_target}/{status.devices} over, "
                         f"{status.pending} pending")
    lines += [f"{d.action}: {d.message}" for d in coord.store.decisions(limit=15)]
    return "\n".join(lines)


def _report(
    coord: Coordinator,
    view: CatalogueView,
    sims: dict[str, SimVariant],
    members: dict[str, list[str]],
    targets: dict[str, float],
    started: float,
    build_s: float,
    met_s: float,
    still_met: bool,
) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    over: list[int] = []
    changes: list[int] = []
    for g, t in targets.items():
        groups[g], g_over, g_changes = _group_figures(coord, members[g], t, started)
        over += g_over
        changes += g_changes
    gaps: list[float] = []
    by_class: dict[str, list[float]] = {}
    for g, ids in members.items():
        if g == REAL_GROUP:
            continue
        for d in ids:
            dev = coord.store.device(d)
            last = dev.last_telemetry if dev else None
            cls = dev.status.hardware.device_class if dev and dev.status else None
            if last is None or cls is None:
                continue
            final = view.by_version.get((last.model_id or "", last.model_version or 0))
            acc = None
            if final is not None:
                acc = view.accuracy.get(Config(final.manifest_sha256, last.operating_point))
            oracle, _cfg = _oracle(view, sims, cls, targets[g])
            if acc is not None:
                gap = 100 * (oracle - acc)
                gaps.append(gap)
                by_class.setdefault(cls, []).append(gap)
    decisions = coord.store.decisions(limit=10_000)
    errors = [
        json.loads(d.details_json).get("error") for d in decisions if d.action == "measured"
    ]
    errors = [e for e in errors if isinstance(e, float)]
    all_devices = [d for ids in members.values() for d in ids]
    moved = [d for d in decisions if d.action in ("rollout", "pin_point", "move_back")]
    moves = [sum(device in d.devices for d in moved) for device in all_devices]
    result = report_head(f"closed loop: {len(all_devices)} devices, {len(targets)} groups")
    result.update({
        "time_to_target_s": max(g["time_to_target_s"] for g in groups.values()),
        "out_of_target_windows_per_device": {
            "mean": round(statistics.mean(over), 2), "max": max(over),
        },
        # Moves the loop made per device (a rollout, a pin, a move back); a rollout whose
        # chosen point is not the variant's default is one move and two transitions.
        "changes_per_device": {"mean": round(statistics.mean(moves), 3), "max": max(moves)},
        "config_transitions_per_device": {
            "mean": round(statistics.mean(changes), 3), "max": max(changes),
        },
        "accuracy_gap_vs_oracle_pt": {
            "mean": round(statistics.mean(gaps), 3) if gaps else None,
            "max": round(max(gaps), 3) if gaps else None,
            "by_class": {c: round(statistics.mean(v), 3) for c, v in sorted(by_class.items())},
        },
        "all_met_at_end": still_met,
        "every_group_met_after_s": round(met_s, 1),
        "prediction_error": {
            "measured_configs": len(errors),
            "median_abs": round(statistics.median(abs(e) for e in errors), 3) if errors else None,
        },
        "decisions": {a: n for a, n in coord.store.decision_counts().items() if n},
        "groups": groups,
        "variants": {
            v.variant_id: {
                "points": [p.get("name") for p in json.loads(v.points_json)],
                "val_accuracy_default": view.accuracy.get(
                    Config(v.manifest_sha256, v.default_point)
                ),
            }
            for v in view.variants.values()
        },
        "catalogue_build_s": round(build_s, 1),
        "loop": LOOP.model_dump(),
        "machine": machine_info(),
    })
    result["load_avg"]["end"] = load_avg()
    return result


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.closedloop", description=__doc__)
    p.add_argument("--devices", type=int, default=200, help="simulated devices (4 groups)")
    p.add_argument("--rate", type=float, default=1.0, help="telemetry windows/s per device")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many s")
    p.add_argument("--settle", type=float, default=30.0, help="watch this long after target")
    p.add_argument("--out", type=Path, default=Path("out/bench/closedloop.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgefleet-closedloop-") as tmp:
        result = run(args, Path(tmp))
    emit_report(result, args.out, emit)
    return 0 if result["all_met_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
