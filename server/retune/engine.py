"""The closed loop: every tick, each group with a target and the loop on is checked, and the
devices that miss it (or are far under it) are moved, through pins and canary rollouts.

What a tick does for a group (docs/closedloop.md):
1. reads each online device's new telemetry windows, maps each window to the catalogue
   configuration it ran (variant at an operating point), and updates the device's streaks and
   running p95, and its class's measured latency (stored per variant, class and point);
2. asks `policy.decide` for every device out of its cool-down and with nothing pending;
3. carries the answers out, grouped: a faster point of the variant a device runs is pinned at
   once (`set_operating_point`, pin); another variant goes to exactly those devices through a
   rollout with canaries, a soak and halt rules (one rollout per group at a time: the others
   wait for the next tick); nothing to go to asks the catalogue for a faster variant, once;
4. writes every decision, with its numbers, to the store.

State that would be costly to lose is in the store (targets, measurements, decisions,
rollouts); the per-device streaks are in memory, so a restarted coordinator begins counting
again, which only delays a move by a few windows.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from edgefleet.agent.hardware import classify_device
from edgefleet.agent.protocol import SetOperatingPoint, Telemetry
from edgefleet.server.fleet.store.base import DeviceRecord, Store
from edgefleet.server.fleet.store.catalogue_base import (
    DecisionAction,
    GroupTarget,
    LatencyRecord,
)
from edgefleet.server.fleet.store.errors import RolloutConflict
from edgefleet.server.retune.catalogue_view import CatalogueView
from edgefleet.server.retune.latency import (
    Config,
    Prediction,
    RunningP95,
    class_figure,
    predict,
    prediction_error,
)
from edgefleet.server.retune.policy import (
    Choice,
    DeviceState,
    LoopSettings,
    NoChoice,
    decide,
)
from edgefleet.server.rollout.engine import RolloutEngine, RolloutError, Sender
from edgefleet.server.rollout.spec import RolloutSpec

log = logging.getLogger(__name__)

# Builds on demand: model name, options (BuildOptions fields) -> job id; raises when refused.
BuildFn = Callable[[str, dict[str, Any]], str]
WINDOWS_READ = 30  # newest windows read per device and tick (more than arrive in one tick)
MIN_WINDOWS = 2  # a device's estimate counts toward its class from this many windows
CALIBRATION_WINDOWS = 8  # windows of a device that make its class's figure (Contribution)
MAX_LOOP_BUILDS = 3  # builds the loop asks for per model, each more aggressive


def device_class_of(d: DeviceRecord) -> str:
    """The class a device reported, else one derived from its machine and board."""
    hw = d.status.hardware if d.status is not None else None
    if hw is None:
        return "unknown"
    if hw.device_class:
        return hw.device_class
    return classify_device(hw.machine, hw.device_model)


@dataclass
class Pending:
    """A change under way on a device: a pin awaiting its windows, or a rollout."""

    kind: str  # "pin" or "rollout"
    to: Config
    since: float
    left: Config | None  # the configuration it leaves
    left_factor: float
    trigger: str
    rollout_id: str | None = None


@dataclass
class Track:
    """What the loop remembers of one device between ticks."""

    last_seq: int = -1
    config: Config | None = None
    est: RunningP95 = field(default_factory=RunningP95)
    miss: int = 0
    under: int = 0
    windows: list[tuple[int, float]] = field(default_factory=list)  # (seq, p95) of the streak
    last_change: float = 0.0
    blocked: dict[Config, float] = field(default_factory=dict)
    pending: Pending | None = None
    held: str | None = None  # the last 'hold' reason recorded, so it is written once
    changes: int = 0


@dataclass
class Contribution:
    """One device's calibration of one configuration: its first CALIBRATION_WINDOWS windows.

    Frozen after that on purpose: a class's figures for the configurations it ran are then
    measured under the same conditions, so when a whole class gets faster or slower (a
    firmware update, a hot summer) the device's factor (live estimate / calibrated figure)
    carries the drift, and configurations measured earlier are still comparable.
    """

    group: str
    p95: RunningP95 = field(default_factory=RunningP95)
    p50: RunningP95 = field(default_factory=RunningP95)
    power: RunningP95 = field(default_factory=RunningP95)

    def add(self, t: Telemetry) -> None:
        if self.p95.windows >= CALIBRATION_WINDOWS:
            return
        self.p95.add(t.latency_ms.p95)
        self.p50.add(t.latency_ms.p50)
        if t.power_w is not None:
            self.power.add(t.power_w)


@dataclass
class GroupStatus:
    """The loop's view of a group after a tick (API and /metrics)."""

    group: str
    devices: int = 0
    out_of_target: int = 0
    pending: int = 0
    p95_ms: dict[str, float] = field(default_factory=dict)  # device -> running estimate


class RetuneEngine:
    """Keeps every group with a target on the most accurate configuration that meets it."""

    def __init__(
        self,
        store: Store,
        rollouts: RolloutEngine,
        sender: Sender,
        *,
        settings: LoopSettings | None = None,
        build: BuildFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.rollouts = rollouts
        self.sender = sender
        self.settings = settings or LoopSettings()
        self.build = build
        self.clock = clock
        self.tracks: dict[str, Track] = defaultdict(Track)
        self.status: dict[str, GroupStatus] = {}
        # (manifest, class) -> device -> running estimate, for the class figures.
        self._per_device: dict[tuple[Config, str], dict[str, Contribution]] = defaultdict(dict)
        self._built: dict[str, list[str]] = {}  # model -> job ids the loop asked for

    # -- the tick -------------------------------------------------------------------------

    def tick(self) -> None:
        """One pass: observe every group, update the class figures once, then act per group.

        Figures are per device class across groups, so they are folded in once per tick (one
        read and at most one write per configuration and class), before any group decides.
        """
        targets = self.store.targets()
        if not targets:
            return
        view = CatalogueView.of(self.store.variants())
        stored = {
            (r.manifest_sha256, r.device_class, r.operating_point): r
            for r in self.store.latencies()
        }
        measured: dict[str, dict[Config, float]] = defaultdict(dict)
        for rec in stored.values():
            if rec.windows >= MIN_WINDOWS:
                measured[rec.device_class][Config(rec.manifest_sha256, rec.operating_point)] = (
                    rec.p95_ms
                )
        observed: dict[str, list[tuple[DeviceRecord, str, Track]]] = {}
        for target in targets:
            observed[target.group] = self._guarded(target, self._observe_group, target, view)
        self._update_measurements(view, measured, stored, self.clock())
        for target in targets:
            if target.loop and observed[target.group]:
                self._guarded(
                    target, self._act, target, view, measured, observed[target.group]
                )

    def _guarded(self, target: GroupTarget, step: Callable[..., Any], *args: Any) -> Any:
        try:
            return step(*args)
        except Exception:  # one group's failure must not stop the others
            log.exception("closed loop: group %s: step failed; retrying next tick", target.group)
            return []

    def _observe_group(
        self, target: GroupTarget, view: CatalogueView
    ) -> list[tuple[DeviceRecord, str, Track]]:
        """Each online device's new windows into its track; the group's status."""
        group = target.group
        now = self.clock()
        members = [d for d in self.store.devices(group) if d.online]
        status = GroupStatus(group, devices=len(members))
        self.status[group] = status
        observed: list[tuple[DeviceRecord, str, Track]] = []
        for d in members:
            cls = device_class_of(d)
            track = self.tracks[d.device_id]
            self._observe(d, cls, track, target, view, now)
            observed.append((d, cls, track))
            if track.est.windows and track.est.value > target.p95_ms:
                status.out_of_target += 1
            if track.est.windows:
                status.p95_ms[d.device_id] = round(track.est.value, 3)
        return observed

    def _act(
        self,
        target: GroupTarget,
        view: CatalogueView,
        measured: dict[str, dict[Config, float]],
        observed: list[tuple[DeviceRecord, str, Track]],
    ) -> None:
        """Follow the changes under way, then decide for the devices free to move."""
        now = self.clock()
        self._follow_pending(target.group, target, view, observed, now)
        self.status[target.group].pending = sum(t.pending is not None for _, _, t in observed)
        if target.pinned_variant is not None:
            self._keep_pinned(target, view, observed, now)
            return
        self._decide(target, view, measured, observed, now)

    # -- observing --------------------------------------------------------------------------

    def _observe(
        self,
        d: DeviceRecord,
        cls: str,
        track: Track,
        target: GroupTarget,
        view: CatalogueView,
        now: float,
    ) -> None:
        """Fold the device's new windows into its streaks and estimates."""
        manifest = d.status.bundle_sha256 if d.status is not None else None
        fresh = [
            r.telemetry
            for r in self.store.telemetry(d.device_id, limit=WINDOWS_READ)
            if r.seq > track.last_seq
        ]
        for t in sorted(fresh, key=lambda t: t.seq):
            track.last_seq = t.seq
            config = view.config_of(t, manifest)
            if config != track.config:
                track.config = config
                _reset(track)
            if t.frames_processed == 0:
                continue  # measured nothing
            p95 = t.latency_ms.p95
            track.est.add(p95)
            if config is not None:
                contribution = self._per_device[(config, cls)].setdefault(
                    d.device_id, Contribution(target.group)
                )
                contribution.add(t)
            self._streak(track, t, p95, target)

    def _streak(self, track: Track, t: Telemetry, p95: float, target: GroupTarget) -> None:
        over = p95 > target.p95_ms or (
            target.max_power_w is not None
            and t.power_w is not None
            and t.power_w > target.max_power_w
        )
        far = p95 < target.p95_ms * self.settings.far_under
        track.miss = track.miss + 1 if over else 0
        track.under = track.under + 1 if far else 0
        if over or far:
            track.windows = [*track.windows[-11:], (t.seq, round(p95, 3))]
        else:
            track.windows = []

    def _update_measurements(
        self,
        view: CatalogueView,
        measured: dict[str, dict[Config, float]],
        stored: dict[tuple[str, str, int], LatencyRecord],
        now: float,
    ) -> None:
        """Class figures from the devices' calibrations, into `measured` and the store."""
        for (config, cls), per_device in self._per_device.items():
            ready = {k: c for k, c in per_device.items() if c.p95.windows >= MIN_WINDOWS}
            figure = class_figure(c.p95.value for c in ready.values())
            if figure is None:
                continue
            measured.setdefault(cls, {})[config] = figure
            old = stored.get((config.manifest, cls, config.point))
            windows = max(sum(c.p95.windows for c in ready.values()), old.windows if old else 0)
            power = class_figure(c.power.value for c in ready.values() if c.power.windows)
            if old is not None and old.windows == windows:
                continue
            predicted = old.predicted_p95_ms if old is not None else None
            first = old is None or old.windows < MIN_WINDOWS
            self.store.put_latency(
                LatencyRecord(
                    manifest_sha256=config.manifest,
                    device_class=cls,
                    operating_point=config.point,
                    windows=windows,
                    devices=len(ready),
                    p95_ms=round(figure, 4),
                    p50_ms=round(class_figure(c.p50.value for c in ready.values()) or 0.0, 4),
                    power_w=round(power, 3) if power is not None else None,
                    predicted_p95_ms=predicted,
                    updated_at=now,
                )
            )
            if first and predicted is not None:
                v = view.variants.get(config.manifest)
                err = prediction_error(predicted, figure)
                self._record(
                    next(iter(ready.values())).group,
                    "measured",
                    sorted(ready),
                    f"{v.variant_id if v else config.manifest[:12]} point {config.point} on "
                    f"{cls}: measured {figure:.2f} ms, predicted {predicted:.2f} ms "
                    f"({err:+.0%})",
                    {
                        "variant": v.variant_id if v else None,
                        "point": config.point,
                        "device_class": cls,
                        "measured_ms": round(figure, 3),
                        "predicted_ms": round(predicted, 3),
                        "error": round(err, 4),
                    },
                )

    # -- pending changes -------------------------------------------------------------------

    def _follow_pending(
        self,
        group: str,
        target: GroupTarget,
        view: CatalogueView,
        observed: list[tuple[DeviceRecord, str, Track]],
        now: float,
    ) -> None:
        s = self.settings
        for d, _cls, track in observed:
            p = track.pending
            if p is None:
                continue
            if track.config == p.to:
                self._settled(track, p, now)
                continue
            if p.kind == "pin":
                if now - p.since > s.pin_timeout_s:
                    track.pending = None
                    self._hold(
                        group,
                        d.device_id,
                        track,
                        f"pin to point {p.to.point} not seen "
                        f"in telemetry within {s.pin_timeout_s:g} s",
                    )
                continue
            r = self.store.rollout(p.rollout_id or "")
            if r is None or r.state in ("halted", "aborted"):
                track.pending = None
                track.blocked[p.to] = max(track.blocked.get(p.to, 0.0), 1.0)
                reason = r.reason if r is not None else "rollout missing"
                self._hold(
                    group,
                    d.device_id,
                    track,
                    f"rollout {p.rollout_id} {r.state if r else ''}: {reason}",
                )
                continue
            running = d.status.bundle_sha256 if d.status is not None else None
            if r.state == "completed" or running == p.to.manifest:
                if running != p.to.manifest:
                    track.pending = None  # the rollout ended without this device
                    continue
                if track.config is not None and track.config.manifest == p.to.manifest:
                    # Installed; it runs the variant's default point: pin the chosen one.
                    self.sender.command(
                        d.device_id, SetOperatingPoint(index=p.to.point, pin=True), 120.0
                    )
                    p.kind = "pin"
                    p.since = now

    def _settled(self, track: Track, p: Pending, now: float) -> None:
        if p.left is not None and p.trigger == "miss":
            track.blocked[p.left] = p.left_factor
        track.pending = None
        track.last_change = now
        track.changes += 1
        track.held = None
        _reset(track)

    # -- deciding --------------------------------------------------------------------------

    def _decide(
        self,
        target: GroupTarget,
        view: CatalogueView,
        measured: dict[str, dict[Config, float]],
        observed: list[tuple[DeviceRecord, str, Track]],
        now: float,
    ) -> None:
        s = self.settings
        predictions: dict[tuple[str, str], dict[Config, Prediction]] = {}
        pins: dict[tuple[str, Config, Config | None], list[tuple[str, Choice, Track]]] = (
            defaultdict(list)
        )
        moves: dict[tuple[str, str], list[tuple[str, Choice, Track]]] = defaultdict(list)
        stuck: dict[str, list[tuple[str, NoChoice, Track]]] = defaultdict(list)
        joining: list[tuple[str, Choice, Track]] = []
        for d, cls, track in observed:
            if track.pending is not None or track.config is None:
                continue
            if now - track.last_change < s.cooldown_s:
                continue
            variant = view.variants.get(track.config.manifest)
            if variant is None:
                continue
            candidates = view.candidates.get(variant.model, [])
            key = (variant.model, cls)
            if key not in predictions:
                predictions[key] = {
                    c.config: p
                    for c in candidates
                    if (p := predict(c.config, cls, measured, view.costs)) is not None
                }
            preds = predictions[key]
            figure = measured.get(cls, {}).get(track.config)
            factor = track.est.value / figure if figure and track.est.windows else 1.0
            state = DeviceState(
                d.device_id,
                cls,
                track.config,
                track.est.value if track.est.windows else None,
                track.miss,
                track.under,
                factor,
                dict(track.blocked),
            )
            verdict = decide(state, candidates, preds, target.p95_ms, target.min_accuracy, s)
            if isinstance(verdict, Choice):
                if verdict.prediction.basis != "measured":
                    self.remember_prediction(
                        verdict.candidate.config, cls, verdict.prediction.p95_ms
                    )
                if verdict.candidate.config.manifest == track.config.manifest:
                    pins[(verdict.trigger, verdict.candidate.config, track.config)].append(
                        (d.device_id, verdict, track)
                    )
                else:
                    moves[(verdict.trigger, verdict.candidate.config.manifest)].append(
                        (d.device_id, verdict, track)
                    )
            elif isinstance(verdict, NoChoice):
                stuck[variant.model].append((d.device_id, verdict, track))
            elif track.miss or track.under:
                # On its way: what it would choose if its streak were complete.
                eager = replace(
                    state,
                    miss_streak=s.miss_windows if track.miss else 0,
                    under_streak=s.under_windows if track.under and not track.miss else 0,
                )
                early = decide(eager, candidates, preds, target.p95_ms, target.min_accuracy, s)
                if isinstance(early, Choice):
                    joining.append((d.device_id, early, track))
        # Devices on their way to the same move join the ones whose streak ended first: one
        # rollout instead of one per tick (a group holds one rollout at a time, so each extra
        # one costs a canary and a soak).
        for device_id, early, track in joining:
            key = (early.trigger, early.candidate.config.manifest)
            if key in moves:
                moves[key].append((device_id, early, track))
        for (trigger, to, frm), items in pins.items():
            self._pin(target, view, trigger, to, frm, items, now)
        if moves:
            self._roll(target, view, moves, now)
        for model, waiting in stuck.items():
            self._stuck(target, view, model, waiting)

    def _pin(
        self,
        target: GroupTarget,
        view: CatalogueView,
        trigger: str,
        to: Config,
        frm: Config | None,
        items: list[tuple[str, Choice, Track]],
        now: float,
    ) -> None:
        for device_id, _choice, track in items:
            self.sender.command(device_id, SetOperatingPoint(index=to.point, pin=True), 120.0)
            track.pending = Pending("pin", to, now, frm, _factor(_choice), trigger)
        choice = items[0][1]
        v = view.variants.get(to.manifest)
        name = v.variant_id if v else to.manifest[:12]
        action: DecisionAction = "pin_point" if trigger == "miss" else "move_back"
        self._record(
            target.group,
            action,
            [i[0] for i in items],
            f"{len(items)} device(s) {_why(trigger, target)}: pinned {name} point "
            f"{to.point} ({choice.candidate.point_name}, val acc "
            f"{choice.candidate.val_accuracy:.4f}), expected {choice.predicted_ms:.1f} ms",
            _details(target, view, trigger, frm, choice, items),
        )

    def _roll(
        self,
        target: GroupTarget,
        view: CatalogueView,
        moves: dict[tuple[str, str], list[tuple[str, Choice, Track]]],
        now: float,
    ) -> None:
        group = target.group
        if self.store.rollouts(group=group, states=["running", "paused"], limit=1):
            for items in moves.values():
                for device_id, _c, track in items:
                    self._hold(group, device_id, track, "waiting for the group's running rollout")
            return
        # The move for the most devices first; the rest wait for the next free tick.
        (trigger, manifest), items = max(moves.items(), key=lambda kv: len(kv[1]))
        v = view.variants[manifest]
        choice = items[0][1]
        rules = [f"p95_ms>{target.p95_ms:g}"] if choice.meets_target else ["p95_ms>1.0x"]
        spec = RolloutSpec(canary=self.settings.canary, soak_s=self.settings.soak_s, halt_if=rules)
        ids = [i[0] for i in items]
        try:
            rid = self.rollouts.create(group, v.bundle_sha256, spec, devices=ids)
        except (RolloutError, RolloutConflict) as exc:
            for device_id, _c, track in items:
                self._hold(group, device_id, track, f"rollout of {v.variant_id} refused: {exc}")
            return
        for _device_id, c, track in items:
            track.pending = Pending(
                "rollout", c.candidate.config, now, track.config, _factor(c), trigger, rid
            )
        frm = items[0][2].config
        self._record(
            group,
            "rollout" if trigger == "miss" else "move_back",
            ids,
            f"{len(ids)} device(s) {_why(trigger, target)}: rolling {v.variant_id} out "
            f"(point {choice.candidate.point_name}, val acc {choice.candidate.val_accuracy:.4f}), "
            f"expected {choice.predicted_ms:.1f} ms; rollout {rid} with canaries, halt if "
            f"{', '.join(rules)}",
            _details(target, view, trigger, frm, choice, items),
            rollout_id=rid,
        )

    def _keep_pinned(
        self,
        target: GroupTarget,
        view: CatalogueView,
        observed: list[tuple[DeviceRecord, str, Track]],
        now: float,
    ) -> None:
        """An operator pinned a variant: every device goes to it (its points still move)."""
        group = target.group
        v = self.store.variant(target.pinned_variant or "")
        if v is None:
            return
        off = [
            (d, t)
            for d, _c, t in observed
            if t.pending is None
            and (d.status is None or d.status.bundle_sha256 != v.manifest_sha256)
        ]
        if not off or self.store.rollouts(group=group, states=["running", "paused"], limit=1):
            return
        spec = RolloutSpec(
            canary=self.settings.canary,
            soak_s=self.settings.soak_s,
            halt_if=[f"p95_ms>{target.p95_ms:g}"],
        )
        ids = [d.device_id for d, _t in off]
        try:
            rid = self.rollouts.create(group, v.bundle_sha256, spec, devices=ids)
        except (RolloutError, RolloutConflict) as exc:
            log.warning("closed loop: group %s: pinned variant %s: %s", group, v.variant_id, exc)
            return
        to = Config(v.manifest_sha256, v.default_point)
        for _d, t in off:
            t.pending = Pending("rollout", to, now, t.config, 1.0, "operator", rid)
        self._record(
            group,
            "rollout",
            ids,
            f"{len(ids)} device(s) not on the pinned variant {v.variant_id}: rollout {rid}",
            {"variant": v.variant_id, "reason": "pinned by the operator"},
            rollout_id=rid,
        )

    def _stuck(
        self,
        target: GroupTarget,
        view: CatalogueView,
        model: str,
        items: list[tuple[str, NoChoice, Track]],
    ) -> None:
        group = target.group
        fresh = [(i, nc, t) for i, nc, t in items if t.held != nc.reason]
        for _i, nc, t in fresh:
            t.held = nc.reason
        misses = [i for i in items if i[1].trigger == "miss"]
        job = None
        options = faster_options(view, model)
        if misses and self.build is not None and options is not None and self._may_build(model):
            try:
                job = self.build(model, options)
                self._built.setdefault(model, []).append(job)
            except Exception as exc:  # a refusal (a build already open) is not fatal
                log.info("closed loop: group %s: no build of %s: %s", group, model, exc)
        if job is not None:
            self._record(
                group,
                "build",
                [i[0] for i in misses],
                f"{len(misses)} device(s) miss {target.p95_ms:g} ms with no faster "
                f"variant in the catalogue: building one ({job})",
                {
                    "model": model,
                    "options": options,
                    "reason": misses[0][1].reason,
                    "windows": {i[0]: i[2].windows for i in misses},
                },
                job_id=job,
            )
        elif fresh:
            self._record(
                group,
                "hold",
                [i[0] for i in fresh],
                f"{len(fresh)} device(s) out of target: {fresh[0][1].reason}",
                {"windows": {i[0]: i[2].windows for i in fresh}},
            )

    def _may_build(self, model: str) -> bool:
        """A new build unless one the loop asked for is still open or failed, or it asked
        MAX_LOOP_BUILDS times already: each is more aggressive than the fastest variant, and a
        build that failed would fail again."""
        asked = self._built.get(model, [])
        if len(asked) >= MAX_LOOP_BUILDS:
            return False
        if asked:
            last = self.store.job(asked[-1])
            if last is None or last.state != "succeeded":
                return False
        return True

    def _hold(self, group: str, device_id: str, track: Track, reason: str) -> None:
        if track.held == reason:
            return
        track.held = reason
        self._record(group, "hold", [device_id], f"{device_id}: {reason}", {"reason": reason})

    def _record(
        self,
        group: str,
        action: DecisionAction,
        devices: list[str],
        message: str,
        details: dict[str, Any],
        rollout_id: str | None = None,
        job_id: str | None = None,
    ) -> None:
        log.info("closed loop: group %s: %s: %s", group, action, message)
        self.store.add_decision(
            group,
            self.clock(),
            action,
            devices,
            message[:1000],
            json.dumps(details, sort_keys=True, default=str),
            rollout_id,
            job_id,
        )

    def remember_prediction(self, config: Config, cls: str, predicted: float) -> None:
        """Keep the first prediction for a configuration a class has not run (its error is
        reported when measurements arrive)."""
        for rec in self.store.latencies(config.manifest):
            if rec.device_class == cls and rec.operating_point == config.point:
                return
        self.store.put_latency(
            LatencyRecord(
                config.manifest,
                cls,
                config.point,
                0,
                0,
                round(predicted, 4),
                round(predicted / 1.3, 4),
                None,
                round(predicted, 4),
                self.clock(),
            )
        )


def _reset(track: Track) -> None:
    """A new configuration: its streaks and estimates start from nothing."""
    track.est = RunningP95()
    track.miss = track.under = 0
    track.windows = []


def _factor(choice: Choice) -> float:
    return choice.predicted_ms / choice.prediction.p95_ms if choice.prediction.p95_ms else 1.0


def _why(trigger: str, target: GroupTarget) -> str:
    if trigger == "miss":
        return f"over {target.p95_ms:g} ms"
    return f"far under {target.p95_ms:g} ms"


def _details(
    target: GroupTarget,
    view: CatalogueView,
    trigger: str,
    frm: Config | None,
    choice: Choice,
    items: list[tuple[str, Choice, Track]],
) -> dict[str, Any]:
    v_from = view.variants.get(frm.manifest) if frm is not None else None
    v_to = view.variants.get(choice.candidate.config.manifest)
    return {
        "trigger": trigger,
        "target_p95_ms": target.p95_ms,
        "min_accuracy": target.min_accuracy,
        "from": {
            "variant": v_from.variant_id if v_from else None,
            "point": frm.point if frm else None,
            "val_accuracy": view.accuracy.get(frm) if frm else None,
        },
        "to": {
            "variant": v_to.variant_id if v_to else None,
            "point": choice.candidate.config.point,
            "name": choice.candidate.point_name,
            "val_accuracy": choice.candidate.val_accuracy,
        },
        "prediction": {
            "class_p95_ms": round(choice.prediction.p95_ms, 3),
            "basis": choice.prediction.basis,
            "detail": choice.prediction.detail,
        },
        "devices": {
            device_id: {
                "measured_p95_ms": round(t.est.value, 3) if t.est.windows else None,
                "expected_p95_ms": round(c.predicted_ms, 3),
                "windows": t.windows,
            }
            for device_id, c, t in items
        },
    }


def faster_options(view: CatalogueView, model: str) -> dict[str, Any] | None:
    """Options for a variant faster than any the model has: more pruning, exits on.

    Starts from the fastest variant's options (what worked) and prunes a quarter more of the
    channels; None when pruning is already at its limit.
    """
    # Every variant of the model counts, one imported without figures (no accuracy) too.
    configs = [c for c in view.costs if c.manifest in view.variants
               and view.variants[c.manifest].model == model]
    if not configs:
        return None
    fastest = min(configs, key=lambda c: view.costs[c])
    v = view.variants[fastest.manifest]
    try:
        base = json.loads(v.options_json) if v.options_json else {}
    except ValueError:
        base = {}
    if not isinstance(base, dict):
        base = {}
    prune = float(base.get("prune") or 0.0)
    if prune >= 0.75:
        return None
    if base.get("quantization") not in (None, "static"):
        base.pop("quantization")  # static INT8: the fastest the optimizer makes on CPUs
    return {
        **base,
        "prune": round(min(0.75, prune + 0.25), 2),
        "exits": base.get("exits") or "auto",
    }
