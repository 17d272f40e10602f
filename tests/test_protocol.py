"""The wire contract: round trips, every rejection with its text, topics, a real broker, docs."""

from __future__ import annotations

import json
import queue
import random
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.agent.protocol import (
    MODELS,
    SIZE_LIMITS,
    BundleOffer,
    Command,
    Event,
    Message,
    Payload,
    PayloadTooLargeError,
    ProtocolError,
    Reply,
    Result,
    Status,
    Telemetry,
    TopicError,
    TopicTree,
    decode,
    decode_topic,
    encode,
    offline_will,
    peek_command_id,
)
from tests.protocol_samples import (
    ALL_MESSAGES,
    COMMAND_BODIES,
    SHA,
    command,
    event,
    fed_task,
    fed_update,
    offer,
    reply,
    result,
    status,
    telemetry,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TREE = TopicTree()
WEIRD_VALUES: list[object] = [None, [], {}, "", -1, 10**30, 1e308, True, "\u0000", [[[]]], {"v": 1}]


def rejected(outcome: object) -> ProtocolError:
    """The ProtocolError decode returned, failing the test if it accepted."""
    assert isinstance(outcome, ProtocolError), f"accepted: {outcome!r}"
    return outcome


def with_field(msg: Payload, **changes: Any) -> bytes:
    """msg's JSON with top-level fields replaced (None deletes), bypassing validation."""
    obj = json.loads(encode(msg))
    for key, value in changes.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Payload) -> None:
    data = encode(msg)
    assert data == json.dumps(json.loads(data), separators=(",", ":")).encode()  # compact
    assert decode(type(msg), data) == msg
    assert decode(msg.KIND, data) == msg


def test_every_command_variant_is_covered() -> None:
    names = {body.name for body in COMMAND_BODIES}
    union = Command.model_fields["command"].annotation
    assert names == {cls.model_fields["name"].default for cls in union.__args__}  # type: ignore[union-attr]


def test_decode_topic_picks_the_model_from_the_topic() -> None:
    cases: list[tuple[str, Message]] = [
        (TREE.device("pi-7", "status"), status()),
        (TREE.device("pi-7", "telemetry"), telemetry()),
        (TREE.device("pi-7", "results"), result()),
        (TREE.device("pi-7", "events"), event()),
        (TREE.device("pi-7", "reply"), reply()),
        (TREE.device("pi-7", "cmd"), command()),
        (TREE.group_cmd("lab-a"), command()),
        (TREE.bundle_meta(SHA), offer()),
        (TREE.fed_task("r-12"), fed_task()),
        (TREE.fed_update("r-12", "pi-7"), fed_update()),
    ]
    for topic, msg in cases:
        assert decode_topic(TREE, topic, encode(msg)) == msg


def test_helpers() -> None:
    will = offline_will(status())
    assert will.online is False and will.model_dump(exclude={"online"}) == status().model_dump(
        exclude={"online"}
    )
    assert command().is_expired(1_767_225_861.0) and not command().is_expired(1_767_225_859.0)
    assert [offer().chunk_length(i) for i in range(3)] == [262144, 262144, 90112]
    assert peek_command_id(with_field(command(), command={"name": "reboot"})) == "c-5b2e0f1a"
    assert peek_command_id(b"\xff") is None and peek_command_id(b'{"id": 5}') is None
    # Oversized: never parsed, the id is read from the first 4 KiB only.
    big = b'{"v": 1, "id": "c-big", "pad": "' + b"x" * 20_000 + b'"}'
    assert peek_command_id(big) == "c-big"
    late = b'{"v": 1, "pad": "' + b"x" * 20_000 + b'", "id": "c-late"}'
    assert peek_command_id(late) is None
    assert peek_command_id(b'{"id": "a\\"b", "pad": "' + b"x" * 20_000 + b'"}') is None


# -- rejections, each with its text ---------------------------------------------------------------

REJECTIONS: list[tuple[str, type[Payload], bytes, str, str]] = [
    (
        "too large",
        Status,
        b"{" + b" " * 5000 + b"}",
        "too_large",
        "status: payload is 5002 bytes, over the 4096-byte limit",
    ),
    ("not utf-8", Result, b'{"label": "\xff"}', "not_utf8", "results: payload is not UTF-8"),
    ("not json", Event, b'{"v": 1,', "not_json", "events: payload is not JSON"),
    ("NaN", Telemetry, b'{"v": 1, "fps": NaN}', "not_json", "NaN is not valid JSON"),
    ("array", Reply, b"[1, 2]", "invalid", "reply: expected a JSON object, got an array"),
    ("string", Reply, b'"hi"', "invalid", "reply: expected a JSON object, got a string"),
    (
        "missing field",
        Telemetry,
        with_field(telemetry(), fps=None),
        "invalid",
        "telemetry: field 'fps': Field required",
    ),
    ("missing v", Result, with_field(result(), v=None), "invalid", "results: field 'v': Field"),
    (
        "wrong type",
        Telemetry,
        with_field(telemetry(), seq="42"),
        "invalid",
        "telemetry: field 'seq': Input should be a valid integer",
    ),
    (
        "nested wrong type",
        Status,
        with_field(status(), hardware={**status().hardware.model_dump(), "cpu_count": 2.5}),
        "invalid",
        "status: field 'hardware.cpu_count': Input should be a valid integer",
    ),
    (
        "extra field",
        Result,
        with_field(result(), colour="red"),
        "invalid",
        "results: field 'colour': Extra inputs are not permitted",
    ),
    (
        "unknown version",
        Telemetry,
        with_field(telemetry(), v=2),
        "unknown_version",
        "telemetry: unknown schema version v=2, this side reads v in [1]",
    ),
    (
        "boolean version",
        Status,
        with_field(status(), v=True),
        "unknown_version",
        "unknown schema version v=true",
    ),
    (
        "unknown command",
        Command,
        with_field(command(), command={"name": "reboot"}),
        "invalid",
        "cmd: field 'command': Input tag 'reboot' found using 'name' does not match any of the "
        "expected tags: 'ping', 'set_operating_point'",
    ),
    (
        "bad command argument",
        Command,
        with_field(command(), command={"name": "snapshot", "quality": 5}),
        "invalid",
        "cmd: field 'command.snapshot.quality': Input should be greater than or equal to 10",
    ),
    (
        "percentiles out of order",
        Telemetry,
        with_field(telemetry(), latency_ms={"p50": 9.0, "p95": 4.0, "p99": 12.0}),
        "invalid",
        "telemetry: field 'latency_ms': percentiles must satisfy p50 <= p95 <= p99, "
        "got p50=9.0, p95=4.0, p99=12.0",
    ),
    (
        "window backwards",
        Telemetry,
        with_field(telemetry(), window_end=1.0),
        "invalid",
        "telemetry: window_end 1.0 is before window_start 1767225600.0",
    ),
    (
        "failed reply without error",
        Reply,
        with_field(reply(ok=False), error=None),
        "invalid",
        "reply: error is required when ok is false",
    ),
    (
        "confidence above 1",
        Result,
        with_field(result(), confidence=1.5),
        "invalid",
        "results: field 'confidence': Input should be less than or equal to 1",
    ),
    (
        "chunk list does not cover size",
        BundleOffer,
        with_field(offer(), size=10),
        "invalid",
        "bundle_meta: 3 chunk digests for size 10 and chunk_size 262144; expected 1",
    ),
    (
        "wildcard in device id",
        Status,
        with_field(status(), device_id="pi/#"),
        "invalid",
        "status: field 'device_id': String should match pattern",
    ),
]


@pytest.mark.parametrize(
    ("model", "payload", "reason", "text"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_rejections_name_what_was_wrong(
    model: type[Payload], payload: bytes, reason: str, text: str
) -> None:
    error = rejected(decode(model, payload))
    assert error.reason == reason
    assert text in error.message, error.message


def test_errors_name_the_topic() -> None:
    topic = TREE.device("pi-7", "telemetry")
    error = rejected(decode_topic(TREE, topic, with_field(telemetry(), seq=-1)))
    assert error.message == (
        "telemetry on edgefleet/v1/dev/pi-7/telemetry: "
        "field 'seq': Input should be greater than or equal to 0"
    )
    assert (error.reason, error.kind, error.topic) == ("invalid", "telemetry", topic)


@pytest.mark.parametrize(
    ("topic", "payload", "reason", "text"),
    [
        ("edgefleet/v1/dev/pi+7/status", encode(status()), "unknown_topic", "device id 'pi+7'"),
        ("edgefleet/v1/dev//status", encode(status()), "unknown_topic", "invalid device id ''"),
        ("edgefleet/v2/dev/pi-7/status", encode(status()), "unknown_topic", "outside the tree"),
        ("edgefleet/v1/dev/pi-7/logs", b"{}", "unknown_topic", "not a topic of the tree"),
        ("edgefleet/v1/dev/pi-7/status", encode(status("pi-8")), "invalid", "'pi-8' does not"),
        (f"edgefleet/v1/bundle/{SHA}/chunk/0", b"\x00raw", "unknown_topic", "no JSON payload"),
        ("edgefleet/v1/fed/r1/task", encode(fed_task()), "invalid", "field 'round_id'"),
        ("edgefleet/v1/fed/r-12/update/pi-8", encode(fed_update()), "invalid", "'pi-7' does not"),
        (f"edgefleet/v1/bundle/{'0' * 64}/meta", encode(offer()), "invalid", "field 'sha256'"),
    ],
)
def test_decode_topic_rejections(topic: str, payload: bytes, reason: str, text: str) -> None:
    error = rejected(decode_topic(TREE, topic, payload))
    assert error.reason == reason and text in error.message, error.message


def test_encode_refuses_an_oversize_payload() -> None:
    big = Reply(id="x", device_id="pi-7", ts=0, ok=True, result={"jpeg_b64": "A" * (1 << 20)})
    with pytest.raises(PayloadTooLargeError, match=r"reply payload is \d+ bytes, over the 1048576"):
        encode(big)
    assert set(SIZE_LIMITS) == set(MODELS)


def test_decode_never_raises() -> None:
    rng = random.Random(20240601)
    valid = [encode(m) for m in ALL_MESSAGES]
    garbage: list[bytes] = [rng.randbytes(rng.randrange(0, 300)) for _ in range(1500)]
    for data in valid:
        garbage += [data[:cut] for cut in range(0, len(data), 7)]
        for _ in range(60):
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] = rng.randrange(256)
            garbage.append(bytes(flipped))
        obj = json.loads(data)
        for key in obj:
            for weird in WEIRD_VALUES:
                garbage.append(json.dumps({**obj, key: weird}).encode())
    garbage += [
        b"[" * 5000,
        b"[" * 900 + b"]" * 900,
        b'{"v":1,"a":' + b"[" * 3000,
        b"\xef\xbb\xbf{}",
    ]
    deep = b'{"v":1,"id":"x","device_id":"a","ts":1,"ok":true,"result":{"a":'
    garbage += [deep + b"[" * depth + b"]" * depth + b"}}" for depth in (200, 800, 5000)]
    topics = [TREE.device("pi-7", "status"), TREE.group_cmd("g"), "", "#", "edgefleet/v1/"]
    topics += ["".join(rng.choice("ab/+#$v1") for _ in range(12)) for _ in range(50)]
    accepted = 0
    for data in garbage:
        for model in MODELS.values():
            outcome = decode(model, data)
            assert isinstance(outcome, ProtocolError | model)
            if isinstance(outcome, ProtocolError):  # the catch-all would mean a bug in decode
                assert not outcome.message.split(": ", 1)[-1].startswith("unexpected ")
            accepted += not isinstance(outcome, ProtocolError)
        outcome = decode_topic(TREE, topics[len(data) % len(topics)], data)
        assert isinstance(outcome, ProtocolError | Payload)
    assert 0 < accepted < len(garbage)  # the corpus holds both valid and invalid payloads


# -- topics --------------------------------------------------------------------------------------


def test_topic_builders() -> None:
    tree = TopicTree(root="test/abc123/edgefleet/v1")
    assert tree.device("pi-7", "telemetry") == "test/abc123/edgefleet/v1/dev/pi-7/telemetry"
    assert tree.group_cmd("lab-a") == "test/abc123/edgefleet/v1/group/lab-a/cmd"
    assert tree.all_devices("status") == "test/abc123/edgefleet/v1/dev/+/status"
    assert TREE.all_group_cmds() == "edgefleet/v1/group/+/cmd"
    assert TREE.shared("coord", TREE.all_devices("telemetry")) == (
        "$share/coord/edgefleet/v1/dev/+/telemetry"
    )
    assert TREE.bundle_meta(SHA) == f"edgefleet/v1/bundle/{SHA}/meta"
    assert TREE.bundle_chunk(SHA, 12) == f"edgefleet/v1/bundle/{SHA}/chunk/12"
    assert TREE.bundle_chunks(SHA) == f"edgefleet/v1/bundle/{SHA}/chunk/+"
    assert TREE.all_bundle_meta() == "edgefleet/v1/bundle/+/meta"
    assert TREE.fed_task("r-3") == "edgefleet/v1/fed/r-3/task"
    assert TREE.fed_update("r-3", "pi-7") == "edgefleet/v1/fed/r-3/update/pi-7"
    assert TREE.fed_updates("r-3") == "edgefleet/v1/fed/r-3/update/+"
    assert TREE.all_fed_tasks() == "edgefleet/v1/fed/+/task"


def test_topics_parse_back() -> None:
    p = TREE.parse(TREE.device("pi-7", "reply"))
    assert (p.kind, p.device_id) == ("reply", "pi-7")
    assert TREE.parse(TREE.group_cmd("lab-a")).group == "lab-a"
    p = TREE.parse(TREE.bundle_chunk(SHA, 3))
    assert (p.kind, p.sha256, p.chunk_index) == ("bundle_chunk", SHA, 3)
    assert TREE.parse(TREE.bundle_meta(SHA)).kind == "bundle_meta"
    assert TREE.parse(TREE.fed_task("r-3")).round_id == "r-3"
    p = TREE.parse(TREE.fed_update("r-3", "pi-7"))
    assert (p.kind, p.round_id, p.device_id) == ("fed_update", "r-3", "pi-7")


@pytest.mark.parametrize("bad", ["", "a/b", "pi+7", "pi#", "#", "+", "-lead", "a" * 65, "x\n"])
def test_ids_with_wildcards_or_separators_are_refused(bad: str) -> None:
    with pytest.raises(TopicError, match=re.escape(f"invalid device id {bad!r}")):
        TREE.device(bad, "status")
    with pytest.raises(TopicError, match="invalid group name"):
        TREE.group_cmd(bad)


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda: TREE.device("pi", "logs"), "unknown device topic kind 'logs'"),  # type: ignore[arg-type]
        (lambda: TREE.bundle_meta("ABC"), "invalid sha256 'ABC'"),
        (lambda: TREE.bundle_chunk(SHA, -1), "invalid chunk index -1"),
        (lambda: TREE.shared("a/b", "x"), "invalid shared subscription group 'a/b'"),
        (lambda: TREE.shared("g", "$share/g/x"), "invalid filter for a shared subscription"),
        (lambda: TopicTree(root="a/+/b"), "invalid topic root"),
        (lambda: TopicTree(root="a//b"), "invalid topic root"),
        (lambda: TREE.parse(f"edgefleet/v1/bundle/{SHA}/chunk/01"), "invalid chunk index '01'"),
        (lambda: TREE.parse("edgefleet/v1/dev/+/status"), "invalid device id '+'"),
        (lambda: TREE.parse("edgefleet/v1/dev/pi-7/status/x"), "not a topic of the tree"),
        (lambda: TREE.parse("edgefleet/v1"), "outside the tree"),
    ],
)
def test_topic_errors(call: Any, text: str) -> None:
    with pytest.raises(TopicError, match=re.escape(text)):
        call()


# -- a real broker -------------------------------------------------------------------------------


class Probe:
    """A paho 2.x MQTT 5 client whose messages land in a queue."""

    def __init__(self, host: str, port: int, *, will: tuple[str, bytes] | None = None) -> None:
        self.client = Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.connect(host, port, keepalive=2)
        self.client.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def _on_connect(self, _c: Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if not rc.is_failure:
            self.connected.set()

    def subscribe(self, topic_filter: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self.subscribed.wait(10), "no SUBACK"

    def next(self) -> MQTTMessage:
        return self.messages.get(timeout=10)

    def drop(self) -> None:
        """Vanish without DISCONNECT, like a device losing power, so the will fires."""
        self.client.loop_stop()  # stop paho first so it cannot reconnect or send DISCONNECT
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_status_telemetry_and_will_over_a_real_broker(mqtt_broker: Any, topic_prefix: str) -> None:
    tree = TopicTree(root=f"{topic_prefix}/edgefleet/v1")
    birth = status("pi-9")
    status_topic = tree.device("pi-9", "status")
    watcher = Probe(mqtt_broker.host, mqtt_broker.port)
    watcher.subscribe(tree.all_devices("status"))
    watcher.subscribe(tree.all_devices("telemetry"))
    device = Probe(
        mqtt_broker.host, mqtt_broker.port, will=(status_topic, encode(offline_will(birth)))
    )
    try:
        device.client.publish(status_topic, encode(birth), qos=1, retain=True).wait_for_publish(5)
        sample = telemetry("pi-9", seq=7)
        device.client.publish(
            tree.device("pi-9", "telemetry"), encode(sample), qos=1
        ).wait_for_publish(5)

        received = [watcher.next(), watcher.next()]
        decoded = {m.topic: decode_topic(tree, m.topic, m.payload) for m in received}
        assert decoded == {status_topic: birth, tree.device("pi-9", "telemetry"): sample}

        device.drop()
        will = watcher.next()
        assert will.topic == status_topic
        gone = decode_topic(tree, will.topic, will.payload)
        assert isinstance(gone, Status) and gone.online is False and gone.boot_id == birth.boot_id

        late = Probe(mqtt_broker.host, mqtt_broker.port)  # the registry after a restart
        late.subscribe(status_topic)
        retained = late.next()
        assert retained.retain and decode_topic(tree, retained.topic, retained.payload) == gone
        late.client.publish(status_topic, b"", qos=1, retain=True).wait_for_publish(5)
        late.close()
    finally:
        device.client.loop_stop()
        watcher.close()


# -- bounds: every number fits both stores (issue 12) ---------------------------------------------

INT64_MAX = 2**63 - 1
YEAR_9999 = 253_402_214_400.0

# (sample, field, largest accepted value, smallest refused one); the refused ones are what an
# attacker sent: seqs at 2**63 made SQLite and PostgreSQL refuse the batch forever.
BOUNDS: list[tuple[Payload, str, object, object]] = [
    (telemetry(), "seq", 2**53 - 1, 2**53),
    (telemetry(), "seq", 2**53 - 1, 2**63),
    (telemetry(), "outbox_overflow", 2**53 - 1, 2**63),
    (telemetry(), "outbox_depth", 2**53 - 1, 2**53),
    (telemetry(), "frames_processed", 2**32 - 1, 2**32),
    (telemetry(), "window_end", YEAR_9999, 1e308),
    (telemetry(), "fps", 1e6, 1e308),
    (telemetry(), "rss_mb", 16_777_216, 1e308),
    (telemetry(), "energy_per_frame_mj", 1e12, 1e308),
    (telemetry(), "model_version", 2**53 - 1, 2**63),
    (event(), "seq", 2**53 - 1, 2**63),
    (event(), "ts", YEAR_9999, 1e308),
    (status(), "ts", YEAR_9999, 1e308),
    (status(), "model_version", 2**53 - 1, 2**64),
    (result(), "ts", YEAR_9999, 1e300),
    (result(), "frame_index", 2**53 - 1, 2**53),
    (result(), "latency_ms", 86_400_000, 1e308),
    (reply(), "ts", YEAR_9999, 1e308),
    (command(), "expires_at", YEAR_9999, 1e308),
    (offer(), "created_ts", YEAR_9999, 1e308),
]


@pytest.mark.parametrize(
    ("msg", "field", "ok", "bad"),
    BOUNDS,
    ids=[f"{type(m).__name__}.{f}={bad}" for m, f, _, bad in BOUNDS],
)
def test_numbers_outside_the_store_bounds_are_refused_at_decode(
    msg: Payload, field: str, ok: object, bad: object
) -> None:
    model = type(msg)
    changes: dict[str, Any] = {field: ok}
    if field == "window_end":
        changes["window_start"] = 0.0
    accepted = decode(model, with_field(msg, **changes))
    assert not isinstance(accepted, ProtocolError), accepted.message
    changes[field] = bad
    error = rejected(decode(model, with_field(msg, **changes)))
    assert error.reason == "invalid" and f"field '{field}'" in error.message, error.message


@pytest.mark.parametrize(
    ("msg", "change", "where"),
    [
        (reply(), {"result": {"a": [1, {"b": -(2**63) - 1}]}}, "result.a"),
        (
            telemetry(),
            {"latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 1e308}},
            "latency_ms.p99",
        ),
        (telemetry(), {"exit_histogram": [1, 2**32]}, "exit_histogram.1"),
    ],
)
def test_nested_numbers_are_bounded_too(msg: Payload, change: dict[str, Any], where: str) -> None:
    error = rejected(decode(type(msg), with_field(msg, **change)))
    assert f"'{where}" in error.message, error.message


def _unbounded_numbers(schema: dict[str, Any], defs: dict[str, Any], path: str) -> list[str]:
    """Paths of integer/number nodes of a JSON schema without both a minimum and a maximum."""
    if "$ref" in schema:
        return _unbounded_numbers(defs[schema["$ref"].split("/")[-1]], defs, path)
    found = []
    if schema.get("type") in ("integer", "number") and "const" not in schema:
        has_max = "maximum" in schema or "exclusiveMaximum" in schema
        has_min = "minimum" in schema or "exclusiveMinimum" in schema
        if not (has_max and has_min):
            found.append(path)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in schema.get(key, []):
            found += _unbounded_numbers(sub, defs, path)
    for name, sub in schema.get("properties", {}).items():
        found += _unbounded_numbers(sub, defs, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += _unbounded_numbers(schema[key], defs, f"{path}[]")
    return found


@pytest.mark.parametrize("model", sorted(MODELS.values(), key=lambda m: m.KIND), ids=str)
def test_every_number_of_every_payload_has_bounds(model: type[Payload]) -> None:
    schema = model.model_json_schema()
    unbounded = _unbounded_numbers(schema, schema.get("$defs", {}), model.__name__)
    # Event details' floats are free-form facts (finite by allow_inf_nan=False) and are only
    # ever stored inside the payload's JSON text, never in a numeric column or a sum.
    assert [p for p in unbounded if p != "Event.details[]"] == []


# -- the docs stay honest -----------------------------------------------------------------------

EXAMPLE = re.compile(r"<!-- model: (\w+) -->\n```json\n(.*?)\n```", re.DOTALL)


def test_every_json_example_in_the_docs_decodes() -> None:
    text = DOCS.read_text()
    examples = EXAMPLE.findall(text)
    assert len(examples) == text.count("```json"), "each ```json block needs <!-- model: X -->"
    by_name = {model.__name__: model for model in MODELS.values()}
    seen_commands = set()
    for name, body in examples:
        outcome = decode(by_name[name], body.encode())
        assert not isinstance(outcome, ProtocolError), outcome.message
        if isinstance(outcome, Command):
            seen_commands.add(outcome.command.name)
    assert {name for name, _ in examples} == set(by_name)
    assert seen_commands == {body.name for body in COMMAND_BODIES}
