"""POST /keys/trust: the coordinator publishes the fleet's key trust chain, retained.

The operator's CLI signs statements with the fleet key (the coordinator need not hold it) and
sends the whole chain here; the coordinator puts it on keys/trust over its own broker identity,
the only one the ACL lets write there. Devices verify every signature themselves: this route
checks only that the document is well formed, so it grants nothing a device would not check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel

from edgefleet.agent.protocol import KeyTrust, ProtocolError, decode, encode
from edgefleet.server.fleet.commander import Commander
from edgefleet.server.fleet.http_json import ErrorDetail

PUBLISH_TIMEOUT_S = 10.0
_PUBLISH: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail, "description": text}
    for code, text in (
        (401, "Missing or wrong bearer token."),
        (403, "The coordinator has no API token."),
        (422, "Not a KeyTrust document (JSON, fields, size)."),
        (503, "No broker connection, or the broker did not acknowledge the publish."),
    )
}


class TrustPublished(BaseModel):
    """What POST /keys/trust put on the broker."""

    topic: str
    statements: int
    bytes: int


def make_keys_router(
    need_commander: Callable[[], Commander], require_token: Callable[..., None]
) -> APIRouter:
    """The /keys/trust route over the coordinator's broker connection."""
    router = APIRouter()

    @router.post(
        "/keys/trust",
        tags=["actions"],
        dependencies=[Depends(require_token)],
        responses=_PUBLISH,
    )
    async def publish_trust(request: Request) -> TrustPublished:
        doc = decode(KeyTrust, await request.body())
        if isinstance(doc, ProtocolError):
            raise HTTPException(422, f"key trust document refused: {doc.message}")
        commander = need_commander()
        topic = commander.tree.keys_trust()
        payload = encode(doc)
        info: Any = commander.ingestor.client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise HTTPException(503, f"the broker did not take {topic}: {exc}") from None
        if not info.is_published():
            raise HTTPException(503, f"the broker did not acknowledge {topic} in time")
        return TrustPublished(topic=topic, statements=len(doc.statements), bytes=len(payload))

    return router
