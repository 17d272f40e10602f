"""Strict JSON in, valid JSON out: how the HTTP API parses bodies and reports bad input.

Python's json module accepts NaN, Infinity and -Infinity (and turns 1e999 into inf), none of
which is JSON; FastAPI's 422 handler then echoed the NaN back, its response could not be
encoded and the client got a 500. Here bodies are parsed refusing those, every parse failure is
a 422, and a 422 never carries a value that cannot be written as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse

# An echoed input longer than this is cut: a 422 need not repeat a whole megabyte.
_ECHO_CHARS = 200


class ErrorDetail(BaseModel):
    """Body of every error but 422: what went wrong, in words."""

    model_config = ConfigDict(extra="forbid")

    detail: str


class _NotJson(ValueError):
    """A token Python's json accepts but JSON does not."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{text[:_ECHO_CHARS]} is out of range for a number")
    return value


def loads_strict(body: bytes) -> Any:
    """Parse JSON as the RFC has it; any failure is a json.JSONDecodeError (FastAPI: 422)."""
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        # _NotJson, an integer past Python's digit limit, bytes that are not UTF-8/16/32,
        # nesting deeper than the parser's stack: all bad input, none a server error.
        doc = body[:_ECHO_CHARS].decode("utf-8", "replace")
        raise json.JSONDecodeError(str(exc) or type(exc).__name__, doc, 0) from None


class StrictJsonRequest(Request):
    """A request whose json() is loads_strict."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """Route class that hands its endpoint a StrictJsonRequest (FastAPI's documented hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler


def _json_safe(value: Any) -> Any:
    """value as FastAPI would encode it when that is valid JSON, else a short repr."""
    try:
        encoded = jsonable_encoder(value)
        json.dumps(encoded, allow_nan=False)
    except (ValueError, TypeError, RecursionError):  # NaN, undecodable bytes, cycles...
        text = repr(value)
        return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."
    if isinstance(encoded, str) and len(encoded) > _ECHO_CHARS:
        return encoded[:_ECHO_CHARS] + "..."
    return encoded


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (detail: [{type, loc, msg, input, ctx}]), always encodable."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for err in exc.errors():
        out: dict[str, Any] = {
            "type": str(err.get("type", "value_error")),
            "loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
        }
        if "input" in err:
            out["input"] = _json_safe(err["input"])
        if "ctx" in err:
            ctx = _json_safe(err["ctx"])
            out["ctx"] = ctx if isinstance(ctx, dict) else {"error": ctx}
        errors.append(out)
    return JSONResponse({"detail": errors}, status_code=422)
