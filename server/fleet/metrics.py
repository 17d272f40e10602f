"""Prometheus metrics of the fleet, computed from the store at scrape time."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefleet.server.fleet.ingest import IngestStats
from edgefleet.server.fleet.store.base import DeviceRecord, Store

NO_GROUP = "none"  # label value for devices outside any group


class FleetCollector(Collector):
    """Reads the registry on every scrape, so several coordinators report the same fleet."""

    def __init__(self, store: Store, stats: IngestStats | None = None) -> None:
        self.store = store
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        devices = self.store.devices()
        by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        p95s: dict[str, list[float]] = defaultdict(list)
        power: dict[str, float] = defaultdict(float)
        for d in devices:
            g = d.group or NO_GROUP
            by_group[g][0] += 1
            tm = d.last_telemetry
            if d.online:
                by_group[g][1] += 1
                if tm is not None:
                    p95s[g].append(tm.latency_ms.p95)
                    if tm.power_w is not None:
                        power[g] += tm.power_w

        size = GaugeMetricFamily("edgefleet_devices", "Registered devices.", labels=["group"])
        online = GaugeMetricFamily("edgefleet_devices_online", "Devices online.", labels=["group"])
        for g, (n, on) in sorted(by_group.items()):
            size.add_metric([g], n)
            online.add_metric([g], on)
        yield size
        yield online

        p95 = GaugeMetricFamily(
            "edgefleet_latency_p95_ms",
            "Median over a group's online devices of their last window's p95 latency.",
            labels=["group"],
        )
        for g, values in sorted(p95s.items()):
            p95.add_metric([g], statistics.median(values))
        yield p95
        watts = GaugeMetricFamily(
            "edgefleet_power_watts", "Power drawn by a group's online devices.", labels=["group"]
        )
        for g, w in sorted(power.items()):
            watts.add_metric([g], w)
        yield watts

        reports = self.store.sequence_reports()
        yield CounterMetricFamily(
            "edgefleet_telemetry_lost",
            "Telemetry sequence numbers declared lost.",
            value=sum(r.lost for r in reports),
        )
        yield CounterMetricFamily(
            "edgefleet_telemetry_dropped",
            "Telemetry sequence numbers the devices reported dropping (outbox full).",
            value=sum(r.dropped for r in reports),
        )
        yield GaugeMetricFamily(
            "edgefleet_telemetry_missing",
            "Sequence numbers not (yet) received; pending gaps may still fill by replay.",
            value=sum(r.missing for r in reports),
        )
        # From the per-device counters, not count(*) of the raw table: a scrape must stay
        # cheap at tens of millions of rows, and a counter must not drop when retention runs.
        yield CounterMetricFamily(
            "edgefleet_telemetry_windows",
            "Distinct telemetry windows received.",
            value=sum(r.received for r in reports),
        )
        yield from self._rollouts()
        yield from self._fed()
        yield from self._loop(devices)
        rejects = CounterMetricFamily(
            "edgefleet_rejected_messages", "Messages rejected, by reason.", labels=["reason"]
        )
        for reason, n in sorted(self.store.reject_counts().items()):
            rejects.add_metric([reason], n)
        yield rejects
        if self.stats is not None:
            yield CounterMetricFamily(
                "edgefleet_ingested_messages",
                "Messages this coordinator ingested; rate() of it is the ingest rate.",
                value=self.stats.received,
            )
            yield CounterMetricFamily(
                "edgefleet_duplicate_messages",
                "Telemetry and events received again (replay, redelivery).",
                value=self.stats.telemetry_duplicates + self.stats.events_duplicates,
            )

    def _rollouts(self) -> Iterator[GaugeMetricFamily]:
        """Unfinished rollouts by state, and their devices by install state."""
        running = self.store.rollouts(states=["running", "paused", "halted", "aborted"])
        live = [r for r in running if r.phase != "done"]
        rollouts = GaugeMetricFamily(
            "edgefleet_rollouts",
            "Rollouts not yet finished, by state (halted and aborted ones still rolling back).",
            labels=["group", "state"],
        )
        devices = GaugeMetricFamily(
            "edgefleet_rollout_devices",
            "Devices of unfinished rollouts, by install state.",
            labels=["group", "rollout", "state"],
        )
        for r in live:
            rollouts.add_metric([r.group, r.state], 1)
            counts: dict[str, int] = defaultdict(int)
            for d in self.store.rollout_devices(r.rollout_id):
                counts[d.state] += 1
            for state, n in sorted(counts.items()):
                devices.add_metric([r.group, r.rollout_id, state], n)
        yield rollouts
        yield devices


    def _fed(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Federated rounds by state, their updates by status, and what ingest ignored."""
        rounds = GaugeMetricFamily(
            "edgefleet_fed_rounds", "Federated rounds in the store, by state.", labels=["state"]
        )
        for state, n in self.store.fed_round_counts().items():
            rounds.add_metric([state], n)
        yield rounds
        updates = CounterMetricFamily(
            "edgefleet_fed_updates",
            "Federated updates stored with their round, by status (accepted, rejected, ...).",
            labels=["status"],
        )
        for status, n in self.store.fed_update_counts().items():
            updates.add_metric([status], n)
        yield updates
        if self.stats is not None:
            ignored = CounterMetricFamily(
                "edgefleet_fed_updates_ignored",
                "Federated updates this coordinator did not take into a round, by reason.",
                labels=["reason"],
            )
            for reason in ("unknown_round", "stale", "late", "duplicate"):
                ignored.add_metric([reason], self.stats.fed_ignored.get(reason, 0))
            yield ignored


    def _loop(
        self, devices: list[DeviceRecord]
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Group targets, devices over them (newest window), and the loop's decisions."""
        targets = GaugeMetricFamily(
            "edgefleet_group_target_p95_ms", "A group's p95 latency target.", labels=["group"]
        )
        enabled = GaugeMetricFamily(
            "edgefleet_group_loop_enabled", "1 when the closed loop acts on a group.",
            labels=["group"],
        )
        over = GaugeMetricFamily(
            "edgefleet_group_out_of_target",
            "Online devices whose newest window's p95 is over their group's target.",
            labels=["group"],
        )
        for t in self.store.targets():
            targets.add_metric([t.group], t.p95_ms)
            enabled.add_metric([t.group], 1.0 if t.loop else 0.0)
            n = sum(
                1
                for d in devices
                if d.group == t.group
                and d.online
                and d.last_telemetry is not None
                and d.last_telemetry.latency_ms.p95 > t.p95_ms
            )
            over.add_metric([t.group], n)
        yield targets
        yield enabled
        yield over
        decisions = CounterMetricFamily(
            "edgefleet_loop_decisions", "Decisions of the closed loop, by action.",
            labels=["action"],
        )
        for action, n in self.store.decision_counts().items():
            decisions.add_metric([action], n)
        yield decisions


def render(store: Store, stats: IngestStats | None = None) -> bytes:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store, stats))
    return generate_latest(registry)
