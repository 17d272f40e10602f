"""Rotating and revoking the fleet key in the key directory, and the statement chain.

The key directory holds the signing key in use (fleet.key / fleet.pub, see keystore.py), every
earlier key as fleet-{id}.key / fleet-{id}.pub (kept: it may sign a revocation during its
overlap, and its public half verifies old bundles), and trust.json: the KeyTrust document of
every statement made so far, oldest first, which the coordinator publishes retained on
keys/trust (POST /keys/trust). Each change is written here before it is published, so a failed
publish is repeated with `edgefleet keys publish`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.agent.bundle.keys import (
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from edgefleet.agent.bundle.trust import (
    StatementRefused,
    TrustStore,
    check_statement,
    sign_revoke,
    sign_trust,
)
from edgefleet.agent.durable import write_atomic
from edgefleet.agent.protocol import KeyTrust, ProtocolError, TrustStatement, decode, encode
from edgefleet.agent.protocol.keys import KEY_ID_PATTERN
from edgefleet.server.keystore import PRIVATE_NAME, PUBLIC_NAME, FleetKey, load_key

log = logging.getLogger(__name__)

CHAIN_NAME = "trust.json"
DEFAULT_OVERLAP_S = 7 * 86400.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


class KeyRotationError(Exception):
    """A rotation or revocation that must not happen; the message says why."""


def parse_overlap(text: str) -> float:
    """'7d', '36h', '1d12h', '3s' -> seconds (> 0)."""
    compact = text.strip().lower()
    parts = list(_DURATION.finditer(compact))
    if not parts or "".join(m.group(0) for m in parts) != compact:
        raise KeyRotationError(f"overlap {text!r}: expected a duration like 7d, 36h, 90m or 30s")
    total = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in parts)
    if total <= 0:
        raise KeyRotationError(f"overlap {text!r}: must be longer than zero")
    return total


def archived_private(directory: Path, kid: str) -> Path:
    """Where a retired signing key is kept."""
    return directory / f"fleet-{kid}.key"


def archived_public(directory: Path, kid: str) -> Path:
    """Where a retired key's public half is kept (give it to `--fleet-key` during the overlap)."""
    return directory / f"fleet-{kid}.pub"


def load_chain(directory: Path) -> KeyTrust:
    """The statements made so far (an empty chain when there are none)."""
    path = directory / CHAIN_NAME
    if not path.exists():
        return KeyTrust(statements=[], published_ts=time.time())
    doc = decode(KeyTrust, path.read_bytes())
    if isinstance(doc, ProtocolError):
        raise KeyRotationError(f"{path}: {doc.message}")
    return doc


def _save_chain(directory: Path, statements: list[TrustStatement], now: float) -> KeyTrust:
    doc = KeyTrust(statements=statements, published_ts=now)
    write_atomic(directory / CHAIN_NAME, encode(doc), 0o644)
    return doc


def _root_keys(directory: Path, chain: KeyTrust) -> list[Ed25519PublicKey]:
    """The key devices hold in their config: the first chain statement's signer, else the
    current key."""
    if not chain.statements:
        return [load_key(directory).public]
    first = chain.statements[0].signer
    for path in _public_files(directory):
        public = load_public_key(path)
        if key_id(public) == first:
            return [public]
    raise KeyRotationError(f"{directory}: no public key file for the first fleet key {first}")


def _replayed(roots: list[Ed25519PublicKey], chain: KeyTrust, now: float) -> TrustStore:
    """What a device holding roots trusts at now after accepting the chain as it was made."""
    store = TrustStore(roots, None, clock=lambda: now)
    for s in chain.statements:
        outcome = store.apply(KeyTrust(statements=[s], published_ts=now), now=s.issued_ts)
        if outcome.refused:
            raise KeyRotationError(f"{CHAIN_NAME}: {outcome.refused[0][1]}")
    return store


def _public_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("fleet*.pub"))


@dataclass(frozen=True)
class Rotation:
    """What `rotate` did."""

    old_id: str
    new_id: str
    old_key_expires_at: float
    chain: KeyTrust


def rotate(directory: Path, overlap_s: float, now: float | None = None) -> Rotation:
    """New signing key; the old one signs its trust and stays trusted for overlap_s.

    Files, in an order that a crash at any point leaves usable: the new key pair is written
    beside the old one, the statement is added to the chain, the old pair is archived as
    fleet-{id}.key/.pub, and the new pair takes the names fleet.key/fleet.pub.
    """
    t = time.time() if now is None else now
    old = load_key(directory)
    chain = load_chain(directory)
    new_private = generate_private_key()
    new_id = key_id(new_private.public_key())
    pending = directory / f"fleet-{new_id}.key"
    save_private_key(new_private, pending)
    save_public_key(new_private.public_key(), archived_public(directory, new_id))
    statement = sign_trust(
        old.private,
        new_private.public_key(),
        not_before=t,
        old_key_expires_at=t + overlap_s,
        issued_ts=t,
    )
    doc = _save_chain(directory, [*chain.statements, statement], t)
    old_private = archived_private(directory, old.id)
    if not old_private.exists():
        os.link(directory / PRIVATE_NAME, old_private)
    save_public_key(old.public, archived_public(directory, old.id))
    os.replace(pending, directory / PRIVATE_NAME)
    save_public_key(new_private.public_key(), directory / PUBLIC_NAME)
    log.info(
        "rotated fleet key %s -> %s; %s trusted until %.0f", old.id, new_id, old.id, t + overlap_s
    )
    return Rotation(old.id, new_id, t + overlap_s, doc)


def revoke(directory: Path, revoked_id: str, now: float | None = None) -> KeyTrust:
    """Add a revocation of revoked_id, signed by the current key (never by the revoked one)."""
    t = time.time() if now is None else now
    if re.fullmatch(KEY_ID_PATTERN[1:-1], revoked_id) is None:
        raise KeyRotationError(f"key id {revoked_id!r}: expected 16 lowercase hex digits")
    current: FleetKey = load_key(directory)
    if current.id == revoked_id:
        raise KeyRotationError(
            f"key {revoked_id} is the current signing key: run `edgefleet keys rotate` first, "
            "then revoke it with the new key"
        )
    chain = load_chain(directory)
    statement = sign_revoke(current.private, revoked_id, issued_ts=t)
    # The device rules, checked here too, so the operator hears a refusal before any device.
    store = _replayed(_root_keys(directory, chain), chain, t)
    try:
        check_statement(store.states(), statement, t)
    except StatementRefused as exc:
        raise KeyRotationError(str(exc)) from None
    return _save_chain(directory, [*chain.statements, statement], t)


def load_archived(directory: Path, kid: str) -> FleetKey:
    """A retired signing key by id."""
    return FleetKey(load_private_key(archived_private(directory, kid)), directory)
