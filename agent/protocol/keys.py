"""Fleet key trust: signed statements that add or revoke a bundle-signing key on devices.

The coordinator keeps one retained `KeyTrust` document on `keys/trust` carrying every statement
ever made, oldest first, so a device that comes online a month later replays the whole chain.
Each statement is signed (Ed25519) by a key the device already trusts, over `canonical_bytes`:
the broker only carries the document, it cannot make a device trust anything.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints, model_validator

from edgefleet.agent.protocol.base import Payload, PayloadKind, Strict
from edgefleet.agent.protocol.bounds import MAX_TS

KEY_ID_PATTERN = r"^[0-9a-f]{16}$"
# Domain separation: a statement's signed bytes can never be a bundle manifest's (which is JSON
# starting with '{'), so a signature made for one can never pass as the other.
STATEMENT_DOMAIN = b"edgefleet-key-statement-v1\n"
MAX_STATEMENTS = 100

KeyId = Annotated[str, StringConstraints(pattern=KEY_ID_PATTERN)]
# 32 raw Ed25519 bytes in base64 (44 characters with padding); 64-byte signatures: 88.
PublicKeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
SignatureB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]
Timestamp = Annotated[float, Field(ge=0, le=MAX_TS)]


class TrustStatement(Strict):
    """One signed change of the fleet's trusted keys."""

    action: Literal["trust", "revoke"] = Field(
        description="trust: add public_key from not_before; revoke: never trust key_id again."
    )
    key_id: KeyId = Field(description="The key added or revoked (first 16 hex of its sha256).")
    public_key: PublicKeyB64 | None = Field(
        None, description="trust only: the new key, 32 raw bytes in base64."
    )
    not_before: Timestamp | None = Field(
        None, description="trust only: Unix seconds from which the new key is trusted."
    )
    old_key_expires_at: Timestamp | None = Field(
        None,
        description="trust only: Unix seconds after which the signing (old) key is no longer "
        "trusted; null keeps it. The overlap is the time between not_before and this.",
    )
    issued_ts: Timestamp = Field(description="Unix seconds when the statement was signed.")
    signer: KeyId = Field(description="Id of the key that signed it; must be trusted already.")
    signature: SignatureB64 = Field(description="Ed25519 over canonical_bytes(statement).")

    @model_validator(mode="after")
    def _fields_fit_action(self) -> TrustStatement:
        if self.action == "trust":
            if self.public_key is None or self.not_before is None:
                raise ValueError("a trust statement needs public_key and not_before")
            if self.old_key_expires_at is not None and self.old_key_expires_at < self.not_before:
                raise ValueError("old_key_expires_at is before not_before: no overlap")
        elif (self.public_key, self.not_before, self.old_key_expires_at) != (None, None, None):
            raise ValueError("a revoke statement carries only key_id (no public_key or times)")
        if self.signer == self.key_id:
            raise ValueError(f"key {self.key_id} cannot sign a statement about itself")
        return self


def canonical_bytes(statement: TrustStatement) -> bytes:
    """The exact bytes a statement's signature covers: every field but the signature."""
    body = statement.model_dump(mode="json", exclude={"signature"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return STATEMENT_DOMAIN + text.encode("ascii")


class KeyTrust(Payload):
    """Retained on keys/trust: the whole statement chain, oldest first."""

    KIND: ClassVar[PayloadKind] = "keys_trust"

    statements: list[TrustStatement] = Field(
        max_length=MAX_STATEMENTS, description="Every statement in the order it was made."
    )
    published_ts: Timestamp = Field(description="Unix seconds when this document was published.")
