"""Ingestion against a real mosquitto with simulated devices: nothing lost, nothing twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet.agent.protocol import TopicTree, encode
from edgefleet.server.fleet.ingest import Ingestor
from edgefleet.server.fleet.simulate import SimConfig, Simulator
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.fleet.store.errors import StoreRefused, StoreUnavailable
from edgefleet.server.local.broker import MosquittoBroker
from edgefleet.server.local.waiting import wait_until
from tests import protocol_samples as samples
from tests.fleet_helpers import RawPublisher, start_ingestor


def _produced(sim: Simulator) -> dict[str, int]:
    return {d.device_id: d.next_seq for d in sim.stats().devices}


def _all_stored(store: Store, produced: dict[str, int]) -> bool:
    reports = {r.device_id: r for r in store.sequence_reports()}
    return all(
        d in reports and reports[d].received == n and reports[d].first_seq == 0
        for d, n in produced.items()
        if n > 0
    )


def _shortfall(store: Store, produced: dict[str, int]) -> str:
    """Which devices are short of windows, for the failure message."""
    reports = {r.device_id: r for r in store.sequence_reports()}
    short = {
        d: (reports[d].first_seq, reports[d].max_seq, reports[d].received, n) if d in reports
        else None
        for d, n in produced.items()
        if d not in reports or reports[d].received != n
    }
    have = sorted(t.seq for t in store.telemetry(next(iter(short)), 1000)) if short else []
    return f"first has {have}; {len(short)} devices short (first, max, received, produced): " + str(
        dict(list(short.items())[:5])
    )


def _assert_lossless(store: Store, produced: dict[str, int]) -> None:
    store.declare_losses(time.time() + 3600, grace_s=0)
    reports = {r.device_id: r for r in store.sequence_reports()}
    for device, n in produced.items():
        rep = reports[device]
        assert (rep.first_seq, rep.max_seq, rep.received) == (0, n - 1, n), device
        assert rep.missing == 0 and rep.lost == 0, device


def _wait_produced(sim: Simulator, more: int, what: str) -> None:
    """Let the devices produce `more` windows (time passing, measured in work, not seconds)."""
    target = sim.stats().produced + more
    wait_until(lambda: sim.stats().produced >= target, 60, what)


def test_200_devices_survive_broker_and_coordinator_restarts(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(db)
    # As `edgefleet-server run` does: a child process decodes and writes.
    ing = start_ingestor(mqtt_broker, topic_prefix, store, writer_url=db)
    sim = Simulator(
        SimConfig(host=mqtt_broker.host, port=mqtt_broker.port, devices=200, rate=2.0,
                  root=topic_prefix, prefix="cam")
    )
    sim.start()
    try:
        wait_until(lambda: len(store.devices()) == 200, 30, "200 devices registered")
        _wait_produced(sim, 400, "two windows per device while all is well")

        # The broker goes away for a while: devices buffer, then replay.
        mqtt_broker.stop()
        wait_until(lambda: sim.stats().online == 0, 30, "every device to see the broker gone")
        _wait_produced(sim, 400, "windows buffered while the broker is down")
        mqtt_broker.start()
        wait_until(lambda: ing.connected.is_set(), 30, "coordinator reconnected")
        wait_until(lambda: sim.stats().online == 200, 60, "every device reconnected")
        _wait_produced(sim, 400, "windows after the broker came back")

        # The coordinator crashes (nothing it had queued is written) and comes back with the
        # same client id: its persistent session hands over what arrived meanwhile.
        ing.kill()
        _wait_produced(sim, 400, "windows sent while the coordinator is down")
        ing = start_ingestor(mqtt_broker, topic_prefix, store, writer_url=db)

        sim.pause()
        assert sim.wait_drained(60), "simulated devices could not deliver their backlog"
        produced = _produced(sim)
        try:
            wait_until(lambda: _all_stored(store, produced), 60, "every window stored")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {_shortfall(store, produced)}") from None
        _assert_lossless(store, produced)
        assert sum(produced.values()) > 200 * 10  # the run was long enough to mean something

        # Some devices die without saying goodbye: their Last Will must reach the registry.
        dead = sim.device_ids()[:20]
        sim.take_offline(dead)
        wait_until(
            lambda: {d.device_id: d.online for d in store.devices()}
            == {d: d not in dead for d in sim.device_ids()},
            30,
            "the registry's online view to match the devices",
        )
        online = {d.device_id: d.online for d in store.devices()}
        assert sum(online.values()) == 180
    finally:
        sim.stop()
        ing.stop()
        store.close()


def test_two_coordinators_share_the_load_and_store_each_window_once(
    mqtt_broker: MosquittoBroker, topic_prefix: str, postgres_dsn: str
) -> None:
    stores = [open_store(postgres_dsn), open_store(postgres_dsn)]
    ings = [
        start_ingestor(mqtt_broker, topic_prefix, s, client_id=f"coord-{i}", share_group="c")
        for i, s in enumerate(stores)
    ]
    sim = Simulator(
        SimConfig(host=mqtt_broker.host, port=mqtt_broker.port, devices=50, rate=5.0,
                  root=topic_prefix, prefix="pg", group="pg")
    )
    sim.start()
    try:
        _wait_produced(sim, 50 * 10, "ten windows per device")
        sim.pause()
        assert sim.wait_drained(60)
        produced = _produced(sim)
        wait_until(lambda: _all_stored(stores[0], produced), 60, "every window stored")
        _assert_lossless(stores[0], produced)
        assert stores[0].telemetry_count() == sum(produced.values())
        inserted = [i.stats.telemetry_inserted for i in ings]
        # The shared subscription split the work; together they wrote each window once.
        assert all(n > 0 for n in inserted), inserted
        assert sum(inserted) == sum(produced.values())

        # Replies reach every coordinator, so the one that sent the command hears them all.
        from edgefleet.agent.protocol import Ping
        from edgefleet.server.fleet.commander import Commander

        outcome = Commander(ings[1]).send(Ping(), group="pg", timeout_s=15)
        assert outcome.missing == [] and len(outcome.replies) == 50
    finally:
        sim.stop()
        for i in ings:
            i.stop()
        for s in stores:
            s.close()


def test_bad_input_is_counted_and_nothing_else_is_lost(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> None:
    tree = TopicTree(topic_prefix)
    store = open_store(str(tmp_path / "fleet.db"))
    store.register("pi-7")
    ing = start_ingestor(mqtt_broker, topic_prefix, store, registration_open=False)
    pub = RawPublisher(mqtt_broker)
    try:
        tel = tree.device("pi-7", "telemetry")
        pub.publish(tel, b"not json")
        pub.publish(tel, b'{"v": 1, "device_id": "pi-7", "seq": "one"}')
        pub.publish(tel, b"{" + b" " * (17 * 1024) + b"}")
        pub.publish(tel, encode(samples.telemetry("pi-8", seq=1)))  # another device's payload
        pub.publish(f"{topic_prefix}/dev/-bad/telemetry", encode(samples.telemetry("pi-7", 2)))
        # An unknown device while registration is closed.
        pub.publish(tree.device("pi-9", "telemetry"), encode(samples.telemetry("pi-9", seq=0)))
        # A device whose clock is a day ahead: kept, but counted.
        skewed = samples.telemetry("pi-7", seq=5).model_copy(
            update={"window_start": time.time() + 86_400, "window_end": time.time() + 86_410}
        )
        pub.publish(tel, encode(skewed))
        # Two agents with one id: boot A, boot B takes over, boot A comes back.
        st = tree.device("pi-7", "status")
        a = samples.status("pi-7")
        b = a.model_copy(update={"boot_id": "00000000-0000-4000-8000-000000000001"})
        for s in (a, b, a):
            pub.publish(st, encode(s))
        # And a good window after all of that.
        now = time.time()
        good = samples.telemetry("pi-7", seq=6).model_copy(
            update={"window_start": now - 10, "window_end": now}
        )
        pub.publish(tel, encode(good))

        wait_until(lambda: store.telemetry_count() == 2, 20, "the two good windows")
        wait_until(lambda: sum(store.reject_counts().values()) >= 6, 20, "six rejects")
        counts = store.reject_counts()
        assert counts.get("invalid_payload") == 2, counts
        assert counts.get("oversized") == 1, counts
        assert counts.get("device_mismatch") == 1, counts
        assert counts.get("invalid_topic") == 1, counts
        assert counts.get("unregistered") == 1, counts
        assert [d.device_id for d in store.devices()] == ["pi-7"]
        assert ing.stats.clock_skewed == 1
        wait_until(lambda: ing.stats.id_conflicts == 1, 10, "the id conflict")
        dev = store.device("pi-7")
        assert dev is not None and dev.id_conflicts == 1
        assert {t.seq for t in store.telemetry("pi-7")} == {5, 6}
    finally:
        pub.close()
        ing.stop()
        store.close()


def test_a_failing_store_keeps_the_messages_until_it_recovers(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> None:
    tree = TopicTree(topic_prefix)
    store = open_store(str(tmp_path / "fleet.db"))
    real_ingest = store.ingest
    fail = {"left": 2}

    def flaky(batch, *, registration_open=True):  # type: ignore[no-untyped-def]
        if fail["left"] > 0:
            fail["left"] -= 1
            raise OSError("disk full")
        return real_ingest(batch, registration_open=registration_open)

    store.ingest = flaky  # type: ignore[method-assign]
    ing: Ingestor = start_ingestor(mqtt_broker, topic_prefix, store)
    pub = RawPublisher(mqtt_broker)
    try:
        for seq in range(5):
            pub.publish(tree.device("pi-7", "telemetry"), encode(samples.telemetry("pi-7", seq)))
        wait_until(lambda: store.telemetry_count() == 5, 20, "all five windows after recovery")
        assert ing.stats.store_errors == 2
    finally:
        pub.close()
        ing.stop()
        store.close()


def test_a_refused_message_is_rejected_alone_and_an_outage_retries_only_the_rest(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """Faults injected at the store boundary (issue 12): seq 3 can never be stored, and the
    store is briefly unavailable while the batch is being split around it."""
    tree = TopicTree(topic_prefix)
    store = open_store(str(tmp_path / "fleet.db"))
    real_ingest = store.ingest
    outage = {"left": 1}

    def faulty(batch, *, registration_open=True):  # type: ignore[no-untyped-def]
        seqs = {t.telemetry.seq for t in batch.telemetry}
        if 3 in seqs:
            raise StoreRefused("NumericValueOutOfRange: bigint out of range (injected)")
        if 4 in seqs and outage["left"] > 0:
            outage["left"] -= 1
            raise StoreUnavailable("OperationalError: database is locked (injected)")
        return real_ingest(batch, registration_open=registration_open)

    store.ingest = faulty  # type: ignore[method-assign]
    # One batch for all six windows, so the outage comes in the middle of the bisection.
    ing = start_ingestor(mqtt_broker, topic_prefix, store, batch_max=6, batch_wait_s=2.0)
    pub = RawPublisher(mqtt_broker)
    try:
        for seq in range(6):
            pub.publish(tree.device("pi-7", "telemetry"), encode(samples.telemetry("pi-7", seq)))
        wait_until(lambda: store.telemetry_count() == 5, 20, "the five storable windows")
        wait_until(lambda: ing.stats.received == 6, 10, "all six accounted for")
        assert sorted(t.seq for t in store.telemetry("pi-7")) == [0, 1, 2, 4, 5]
        assert ing.stats.store_errors == 1 and ing.stats.rejects["unstorable"] == 1
        (report,) = store.sequence_reports("pi-7")
        # What was committed before the outage was acked, not written again.
        assert report.duplicates == 0 and ing.stats.telemetry_duplicates == 0
        assert store.reject_counts()["unstorable"] == 1
    finally:
        pub.close()
        ing.stop()
        store.close()


@pytest.mark.parametrize("n", [3])
def test_replies_reach_a_waiting_command(
    mqtt_broker: MosquittoBroker, topic_prefix: str, tmp_path: Path, n: int
) -> None:
    from edgefleet.agent.protocol import Ping
    from edgefleet.server.fleet.commander import Commander

    store = open_store(str(tmp_path / "fleet.db"))
    ing = start_ingestor(mqtt_broker, topic_prefix, store)
    sim = Simulator(
        SimConfig(host=mqtt_broker.host, port=mqtt_broker.port, devices=n, rate=1.0,
                  root=topic_prefix, prefix="cmd", group="lobby")
    )
    sim.start()
    try:
        wait_until(lambda: len(store.devices("lobby")) == n, 20, "devices in group lobby")
        commander = Commander(ing)
        one = commander.send(Ping(), device="cmd-00000", timeout_s=10)
        assert [r.device_id for r in one.replies] == ["cmd-00000"] and one.replies[0].ok
        everyone = commander.send(Ping(), group="lobby", timeout_s=10)
        assert everyone.missing == [] and len(everyone.replies) == n
        logged = {c.command_id: c for c in store.commands()}
        assert everyone.command_id in logged
        wait_until(
            lambda: len({c.command_id: c for c in store.commands()}[everyone.command_id].replies)
            == n,
            10,
            "replies in the command log",
        )
    finally:
        sim.stop()
        ing.stop()
        store.close()
