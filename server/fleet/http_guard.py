"""The HTTP API's front door: the bearer token and the body size limit, before any body is read.

FastAPI reads and parses a request's body before it runs the route's dependencies, so a token
dependency alone lets an anonymous client make the coordinator buffer and parse whatever it
sends (a 100 MB body took it from 142 to 614 MB and stalled /healthz). This pure ASGI layer
answers from the request line and headers alone: an action (any method but GET, HEAD,
OPTIONS) without the right token is refused before a byte of its body is received, a declared
Content-Length over the limit is refused up front, and a body without one (chunked) is cut
off as soon as what arrived passes the limit.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Reading the fleet is open (like a Prometheus scrape); every other method is an action.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_MAX_BODY_BYTES = 1 << 20


def bearer_refusal(token: str | None, authorization: str | None) -> tuple[int, str] | None:
    """Why an action is refused, as (status, detail); None when it carries the right token."""
    if token is None:
        return 403, "actions are disabled: the coordinator has no API token set"
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return 401, "missing or wrong bearer token"
    return None


def too_large_detail(limit: int) -> str:
    """The 413 message, naming the limit so a client knows what it may send."""
    return f"request body larger than the limit of {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from receive() once a body passes the limit; FastAPI renders it as a JSON 413.

    A fastapi.HTTPException, because FastAPI's body reading passes those through and turns any
    other exception into a 400.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_detail(limit))


class RequestGuard:
    """ASGI middleware: token for actions, then the body limit, then the application."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body_bytes: int,
        path_limits: dict[str, int] | None = None,
    ) -> None:
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, not {max_body_bytes}")
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        # Exact paths with their own limit: a bundle upload is streamed to disk by its route,
        # which enforces this limit as it reads; every other body keeps the small one.
        self.path_limits = dict(path_limits or {})

    def _limit(self, scope: Scope) -> int:
        return self.path_limits.get(scope.get("path", ""), self.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] not in SAFE_METHODS:
            refusal = bearer_refusal(self.token, headers.get("authorization"))
            if refusal is not None:
                status, detail = refusal
                extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                await _answer(scope, send, status, detail, extra)
                return
        declared = headers.get("content-length")
        if declared is not None:
            # The HTTP server has already refused a malformed Content-Length; be safe anyway.
            if not declared.isdigit():
                await _answer(scope, send, 400, f"invalid Content-Length {declared[:40]!r}")
                return
            if int(declared) > self._limit(scope):
                await _answer(scope, send, 413, too_large_detail(self._limit(scope)))
                return
        await self._guarded(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit(scope)
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            # Normally FastAPI's handler has answered already; this covers a read elsewhere.
            if started:
                raise
            await _answer(scope, send, 413, too_large_detail(limit))


async def _answer(
    scope: Scope, send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    """A JSON error in FastAPI's shape; never reads the request body."""

    async def no_body() -> Message:  # a JSONResponse does not read; be sure of it
        return {"type": "http.disconnect"}

    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(
        scope, no_body, send
    )
