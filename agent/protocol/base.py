"""The base every payload model derives from: schema version and strictness."""

from __future__ import annotations

from typing import Annotated, ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from edgefleet.agent.protocol.ids import ID_PATTERN

SCHEMA_VERSION: Final = 1
# Versions this code can read; during a breaking change both old and new are listed.
SUPPORTED_VERSIONS: frozenset[int] = frozenset({SCHEMA_VERSION})

PayloadKind = Literal[
    "status",
    "telemetry",
    "results",
    "events",
    "cmd",
    "reply",
    "bundle_meta",
    "keys_trust",
    "fed_task",
    "fed_update",
]

ModelId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class Strict(BaseModel):
    """A nested part of a payload: unknown keys and NaN/inf are errors."""

    # extra="forbid": a misspelt key is a loud error rather than a silently ignored field.
    # allow_inf_nan=False: JSON has no NaN/Infinity and a NaN latency would poison aggregates.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Payload(Strict):
    """A top-level message published on one kind of topic."""

    KIND: ClassVar[PayloadKind]

    v: Literal[1] = Field(
        SCHEMA_VERSION, description="Schema version; bumped only by breaking changes."
    )
