"""A hostile HTTP client against the coordinator's API: auth before the body, a body limit,
strict JSON, and errors that are themselves valid JSON.

The ASGI-level tests hand the app a receive() that records every call, so "the body was never
read" is observed, not inferred from memory use; the live tests run a real coordinator
(uvicorn, a real mosquitto) and talk raw HTTP/1.1 over a socket, so stalled and chunked
bodies are what a real client would send.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.server.fleet.api import create_app
from edgefleet.server.fleet.client import ApiError, FleetClient
from edgefleet.server.fleet.ingest import IngestConfig
from edgefleet.server.fleet.service import Coordinator, CoordinatorConfig
from edgefleet.server.fleet.store import open_store
from edgefleet.server.fleet.store.base import Store
from edgefleet.server.local.broker import MosquittoBroker

TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Generous: the server answers from the headers alone, so only a server that waits for a body
# it was never going to get comes near this.
ANSWER_TIMEOUT_S = 15.0


def _strict_json(text: str) -> Any:
    """Parse as RFC 8259 JSON: NaN and Infinity are errors, as any other client would see."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(str(tmp_path / "fleet.db"))
    s.register("pi-1", "lab-a")
    try:
        yield s
    finally:
        s.close()


# --- ASGI level: what the app reads -------------------------------------------------------


class _Exchange:
    """One request driven straight through the ASGI app, counting body reads."""

    def __init__(self, body_chunks: int = 1024, chunk: bytes = b"x" * 1024) -> None:
        self.receive_calls = 0
        # Finite, so that an app that does read everything fails the test instead of hanging.
        self.body_chunks = body_chunks
        self.chunk = chunk
        self.messages: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.receive_calls += 1
        more = self.receive_calls < self.body_chunks
        return {"type": "http.request", "body": self.chunk, "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def run(self, app: Any, method: str, path: str, headers: dict[str, str]) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "root_path": "", "query_string": b"", "server": ("127.0.0.1", 8080),
            "client": ("127.0.0.1", 40000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        asyncio.run(app(scope, self.receive, self.send))

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def json(self) -> Any:
        body = b"".join(m.get("body", b"") for m in self.messages[1:])
        return _strict_json(body.decode())


def test_unauthenticated_action_is_refused_before_its_body_is_read(store: Store) -> None:
    app = create_app(store, token=TOKEN)
    huge = {"Content-Type": "application/json", "Content-Length": str(100 << 20)}
    for headers in (huge, {**huge, "Authorization": "Bearer wrong"},
                    {**huge, "Authorization": f"Basic {TOKEN}"}):
        ex = _Exchange()
        ex.run(app, "POST", "/devices", headers)
        assert ex.status == 401 and ex.receive_calls == 0, headers
        assert ex.json == {"detail": "missing or wrong bearer token"}
    # No Content-Length (chunked): refused without a read all the same.
    ex = _Exchange()
    ex.run(app, "PUT", "/devices/pi-1/group", {"Content-Type": "application/json"})
    assert ex.status == 401 and ex.receive_calls == 0
    # No token configured: every action is closed, and still nothing is read.
    ex = _Exchange()
    ex.run(create_app(store, token=None), "POST", "/devices", huge)
    assert ex.status == 403 and ex.receive_calls == 0


def test_declared_length_over_the_limit_is_refused_up_front(store: Store) -> None:
    app = create_app(store, token=TOKEN, max_body_bytes=4096)
    ex = _Exchange()
    ex.run(app, "POST", "/devices", {**AUTH, "Content-Type": "application/json",
                                     "Content-Length": "4097"})
    assert ex.status == 413 and ex.receive_calls == 0
    assert ex.json == {"detail": "request body larger than the limit of 4096 bytes"}
    # Reads are limited too (a GET with a body is odd, not a way around the limit).
    ex = _Exchange()
    ex.run(app, "GET", "/devices", {"Content-Length": "1000000"})
    assert ex.status == 413 and ex.receive_calls == 0


def test_a_body_without_length_is_cut_off_once_it_passes_the_limit(store: Store) -> None:
    app = create_app(store, token=TOKEN, max_body_bytes=4096)
    ex = _Exchange(body_chunks=1024)  # 1 MiB sent, no Content-Length
    ex.run(app, "POST", "/devices", {**AUTH, "Content-Type": "application/json"})
    assert ex.status == 413
    assert ex.json == {"detail": "request body larger than the limit of 4096 bytes"}
    assert ex.receive_calls == 4096 // 1024 + 1  # read until just past the limit, no further
    # A body at the limit exactly is read and parsed (here: not JSON, so 422).
    ex = _Exchange(body_chunks=4)
    ex.run(app, "POST", "/devices", {**AUTH, "Content-Type": "application/json"})
    assert ex.status == 422 and ex.receive_calls == 4


# --- strict JSON and JSON-safe errors -------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"device_id": NaN}',  # the attacker's request: was a 500
        b'{"device_id": Infinity}',
        b'{"device_id": -Infinity}',
        b'{"device_id": 1e999}',  # Python's json makes this inf
        b'{"device_id": "cam-1", "group": NaN}',
        b'{"device_id": ' + b"9" * 5000 + b"}",  # past Python's int digit limit
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser's stack
        b'{"device_id": "\xff\xfe\xfa"}',  # not UTF-8
        b"\x00\x01\x02",
    ],
)
def test_bodies_that_are_not_json_are_a_422_in_json(store: Store, body: bytes) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    r = client.post("/devices", content=body, headers={**AUTH,
                                                       "Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    detail = _strict_json(r.text)["detail"]
    assert detail and all({"type", "loc", "msg"} <= set(err) for err in detail)
    assert store.device("cam-1") is None


def test_non_finite_numbers_are_refused_everywhere(store: Store) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    for body in (b'{"command": {"name": "ping"}, "timeout_s": NaN}',
                 b'{"command": {"name": "set_telemetry_interval", "seconds": Infinity}}'):
        r = client.post("/devices/pi-1/commands", content=body,
                        headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        err = _strict_json(r.text)["detail"][0]
        assert err["type"] == "json_invalid" and "not a JSON number" in err["ctx"]["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/octet-stream"])
def test_a_body_of_another_type_is_a_422_in_json(store: Store, content_type: str | None) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    # Undecodable bytes: FastAPI's own handler would try to echo them as text.
    r = client.post("/devices", content=b"\xff\xfe{not json", headers=headers)
    assert r.status_code == 422
    assert isinstance(_strict_json(r.text)["detail"], list)


def test_bad_ids_are_422s_in_fastapis_shape(store: Store) -> None:
    client = TestClient(create_app(store, token=TOKEN))
    for r in (
        client.post("/devices", json={"device_id": "a b"}, headers=AUTH),
        client.post("/devices", json={"device_id": "cam-1", "group": "a/b"}, headers=AUTH),
        client.put("/devices/pi-1/group", json={"group": "#"}, headers=AUTH),
        client.get("/devices/bad+id"),
        client.get("/devices", params={"group": "\x00"}),
        client.get("/events", params={"device": "x" * 65}),
        client.post("/groups/a+b/commands", json={"command": {"name": "ping"}}, headers=AUTH),
    ):
        assert r.status_code == 422, (r.request.url, r.text)
        assert isinstance(_strict_json(r.text)["detail"], list)


# --- live: a real coordinator, raw sockets --------------------------------------------------


@pytest.fixture
def coordinator(tmp_path: Path, mqtt_broker: MosquittoBroker,
                topic_prefix: str) -> Iterator[Coordinator]:
    cfg = CoordinatorConfig(
        store=str(tmp_path / "coord.db"),
        mqtt=IngestConfig(host=mqtt_broker.host, port=mqtt_broker.port, root=topic_prefix,
                          client_id="coord-hostile"),
        http_port=0,
        token=TOKEN,
        http_max_body_bytes=64 * 1024,
        maintenance_every_s=3600,
    )
    coord = Coordinator(cfg)
    coord.start()
    try:
        yield coord
    finally:
        coord.stop()


def _connect(coord: Coordinator) -> socket.socket:
    host, port = coord.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT_S)
    return sock


def _status(sock: socket.socket) -> int:
    """The response's status, read within ANSWER_TIMEOUT_S (socket.timeout otherwise)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    version, status, _reason = data.split(b"\r\n", 1)[0].decode().split(" ", 2)
    assert version == "HTTP/1.1", data[:200]
    return int(status)


def test_live_a_stalled_unauthenticated_upload_gets_401_at_once(coordinator: Coordinator) -> None:
    with _connect(coordinator) as sock:
        sock.sendall(b"POST /devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 104857600\r\n\r\n{")  # ... and then nothing more
        assert _status(sock) == 401
        # Meanwhile the API answers others: the stalled upload holds nothing up.
        assert FleetClient(coordinator.url, TOKEN, timeout=ANSWER_TIMEOUT_S).groups() == []


def test_live_body_limit_declared_and_chunked(coordinator: Coordinator) -> None:
    limit = coordinator.cfg.http_max_body_bytes
    with _connect(coordinator) as sock:
        sock.sendall(b"POST /devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: " + str(limit + 1).encode()
                     + b"\r\n\r\n")
        assert _status(sock) == 413
    with _connect(coordinator) as sock:
        sock.sendall(b"POST /devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 8192
        for _ in range(limit // len(chunk) + 1):  # just past the limit, then stall: no end
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert _status(sock) == 413
    # The operator's client reports it with the limit in words.
    client = FleetClient(coordinator.url, TOKEN, timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(ApiError, match=f"HTTP 413: .*limit of {limit} bytes"):
        client.register("cam-1", group="x" * limit)
    with pytest.raises(ApiError, match="HTTP 422: device_id: String should match pattern"):
        client.register("a b")


def test_live_nan_is_a_422(coordinator: Coordinator) -> None:
    with _connect(coordinator) as sock:
        body = b'{"device_id": NaN}'
        sock.sendall(b"POST /devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _status(sock) == 422
