"""The device's trust store: which keys may sign bundles now.

Trust = the keys of the agent's config, changed by the signed statements (agent/protocol/keys.py)
the device has accepted, kept in state_dir/keys/trust.json. A statement is accepted only when
a key trusted at that moment signed it, so whoever controls the broker cannot add a key; the
rules (docs/security.md, "Rotating and revoking the fleet key"):

* trust: the new key is trusted from `not_before`; the signing key stops being trusted at
  `old_key_expires_at` (the overlap). A key id once known is never introduced again.
* revoke: signed by a trusted key other than the revoked one; permanent; refused when it would
  leave no key without an expiry (a device with no lasting key could never be updated again).

Statements are checked against the clock once, when accepted; the persisted list is replayed
on load checking signatures only, so a device that was offline for a month catches up through
the whole chain in order and a later restart gives the same state.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgefleet.agent.bundle.keys import (
    KeyFileError,
    key_id,
    load_public_key,
    parse_public_key,
    sign,
    verify,
)
from edgefleet.agent.durable import write_atomic
from edgefleet.agent.protocol import ProtocolError, decode, encode
from edgefleet.agent.protocol.keys import KeyTrust, TrustStatement, canonical_bytes

log = logging.getLogger(__name__)

TRUST_FILE = Path("keys") / "trust.json"


class StatementRefused(Exception):
    """A statement breaks a rule; the message says which, naming the keys."""


@dataclass
class KeyState:
    """What the device knows about one key id."""

    key_id: str
    public: Ed25519PublicKey | None  # None: revoked before it was ever introduced
    source: str  # "config" or the id of the key that introduced it
    not_before: float | None = None
    expires_at: float | None = None
    revoked: bool = False

    def valid(self, now: float) -> bool:
        """Trusted at now: introduced, started, not expired, not revoked."""
        return (
            self.public is not None
            and not self.revoked
            and (self.not_before is None or self.not_before <= now)
            and (self.expires_at is None or now < self.expires_at)
        )

    def lasting(self) -> bool:
        """Will stay trusted with no further statement (no expiry, not revoked)."""
        return self.public is not None and not self.revoked and self.expires_at is None


def public_b64(key: Ed25519PublicKey) -> str:
    """The 32 raw bytes of a public key in base64, as statements carry it."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def statement_digest(statement: TrustStatement) -> str:
    """Identity of a statement: sha256 of its signed bytes."""
    return hashlib.sha256(canonical_bytes(statement)).hexdigest()


def sign_trust(
    signer: Ed25519PrivateKey,
    new_key: Ed25519PublicKey,
    *,
    not_before: float,
    old_key_expires_at: float | None,
    issued_ts: float,
) -> TrustStatement:
    """A statement, signed by signer, that new_key is trusted from not_before."""
    unsigned = TrustStatement.model_construct(
        action="trust",
        key_id=key_id(new_key),
        public_key=public_b64(new_key),
        not_before=not_before,
        old_key_expires_at=old_key_expires_at,
        issued_ts=issued_ts,
        signer=key_id(signer.public_key()),
        signature="",
    )
    return _signed(signer, unsigned)


def sign_revoke(signer: Ed25519PrivateKey, revoked_id: str, *, issued_ts: float) -> TrustStatement:
    """A statement, signed by signer, that key revoked_id is never trusted again."""
    unsigned = TrustStatement.model_construct(
        action="revoke",
        key_id=revoked_id,
        public_key=None,
        not_before=None,
        old_key_expires_at=None,
        issued_ts=issued_ts,
        signer=key_id(signer.public_key()),
        signature="",
    )
    return _signed(signer, unsigned)


def _signed(signer: Ed25519PrivateKey, unsigned: TrustStatement) -> TrustStatement:
    signature = base64.b64encode(sign(signer, canonical_bytes(unsigned))).decode("ascii")
    # Validate the finished statement: a bad field fails here, on the signing side.
    return TrustStatement.model_validate({**unsigned.model_dump(), "signature": signature})


@dataclass
class ApplyOutcome:
    """What one KeyTrust document changed."""

    accepted: list[TrustStatement] = field(default_factory=list)
    refused: list[tuple[TrustStatement, str]] = field(default_factory=list)


def check_statement(
    keys: dict[str, KeyState], statement: TrustStatement, now: float | None
) -> None:
    """Raise StatementRefused unless statement may be applied to keys; now=None skips times."""
    s = statement
    what = f"{s.action} statement for key {s.key_id} signed by {s.signer}"
    signer = keys.get(s.signer)
    if signer is None or signer.public is None:
        raise StatementRefused(f"{what}: the signer is not a key this device knows")
    if now is not None and not signer.valid(now):
        state = "revoked" if signer.revoked else "not trusted at this time (expired or not yet)"
        raise StatementRefused(f"{what}: the signer is {state}")
    signature = base64.b64decode(s.signature)
    if not verify(signer.public, signature, canonical_bytes(s)):
        raise StatementRefused(f"{what}: the signature does not verify under key {s.signer}")
    known = keys.get(s.key_id)
    if s.action == "trust":
        assert s.public_key is not None
        new = parse_public_key(s.public_key.encode("ascii"), f"statement for {s.key_id}")
        if key_id(new) != s.key_id:
            raise StatementRefused(f"{what}: key_id does not match public_key ({key_id(new)})")
        if known is not None:
            state = "revoked (revocation is permanent)" if known.revoked else "already known"
            raise StatementRefused(f"{what}: the key is {state}")
        return
    if known is not None and known.revoked:
        raise StatementRefused(f"{what}: the key is already revoked")
    left = [k for k in keys.values() if k.key_id != s.key_id and k.lasting()]
    if not left:
        raise StatementRefused(
            f"{what}: it would leave no key without an expiry; rotate to a new key first"
        )


def apply_statement(keys: dict[str, KeyState], statement: TrustStatement) -> None:
    """Change keys by a statement check_statement passed."""
    s = statement
    if s.action == "trust":
        assert s.public_key is not None
        public = parse_public_key(s.public_key.encode("ascii"), f"statement for {s.key_id}")
        keys[s.key_id] = KeyState(s.key_id, public, s.signer, not_before=s.not_before)
        signer = keys[s.signer]
        if s.old_key_expires_at is not None:
            ends = signer.expires_at
            signer.expires_at = (
                s.old_key_expires_at if ends is None else min(ends, s.old_key_expires_at)
            )
    else:
        known = keys.get(s.key_id)
        if known is None:
            keys[s.key_id] = KeyState(s.key_id, None, s.signer, revoked=True)
        else:
            known.revoked = True


class TrustStore:
    """Config keys plus the accepted statements; thread-safe; persisted on every change."""

    def __init__(
        self,
        config_keys: Iterable[Ed25519PublicKey],
        path: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._base = {key_id(k): KeyState(key_id(k), k, "config") for k in config_keys}
        self._accepted: list[TrustStatement] = []
        self._keys = self._fold([])
        self._refused: set[str] = set()
        if path is not None and path.exists():
            self._load(path)

    @classmethod
    def open(cls, key_files: Iterable[Path], state_dir: Path) -> TrustStore:
        """The store of an agent: its config's key files and state_dir/keys/trust.json."""
        return cls([load_public_key(p) for p in key_files], state_dir / TRUST_FILE)

    def _fold(self, statements: list[TrustStatement]) -> dict[str, KeyState]:
        keys = {i: KeyState(**vars(k)) for i, k in self._base.items()}
        for s in statements:
            apply_statement(keys, s)
        return keys

    def _load(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("trust store %s: cannot read (%s); using the config keys", path, exc)
            return
        doc = decode(KeyTrust, data)
        if isinstance(doc, ProtocolError):
            log.error("trust store %s: %s; using the config keys", path, doc.message)
            return
        keys = self._fold([])
        for s in doc.statements:
            try:
                check_statement(keys, s, None)  # times were checked when it was accepted
            except (StatementRefused, KeyFileError) as exc:
                log.error("trust store %s: %s; statements from here on ignored", path, exc)
                break
            apply_statement(keys, s)
            self._accepted.append(s)
        self._keys = keys

    def _save(self) -> None:
        if self.path is None:
            return
        doc = KeyTrust(statements=self._accepted, published_ts=self.clock())
        write_atomic(self.path, encode(doc), 0o644)

    # -- reading ---------------------------------------------------------------------------

    def trusted_keys(self, now: float | None = None) -> list[Ed25519PublicKey]:
        """The keys that may sign a bundle at now (default: the clock's now)."""
        t = self.clock() if now is None else now
        with self._lock:
            return [k.public for k in self._keys.values() if k.public is not None and k.valid(t)]

    __call__ = trusted_keys

    def unrevoked_keys(self) -> list[Ed25519PublicKey]:
        """Every key ever trusted and not revoked, also expired ones: a bundle installed while
        its key was trusted stays fit to run (and to roll back to) after the overlap."""
        with self._lock:
            return [k.public for k in self._keys.values() if k.public is not None and not k.revoked]

    def trusted_ids(self, now: float | None = None) -> list[str]:
        """Ids of trusted_keys(now), sorted."""
        return sorted(key_id(k) for k in self.trusted_keys(now))

    def states(self) -> dict[str, KeyState]:
        """A copy of what the store knows about every key id."""
        with self._lock:
            return {i: KeyState(**vars(k)) for i, k in self._keys.items()}

    @property
    def accepted(self) -> list[TrustStatement]:
        """The accepted statements, in order."""
        with self._lock:
            return list(self._accepted)

    # -- changing --------------------------------------------------------------------------

    def apply(self, doc: KeyTrust, now: float | None = None) -> ApplyOutcome:
        """Accept the new valid statements of doc in order; refuse the rest, naming why.

        Statements already accepted are skipped; a refused one changes nothing, and the
        statements after it are still judged (each on its own signature).
        """
        t = self.clock() if now is None else now
        outcome = ApplyOutcome()
        with self._lock:
            seen = {statement_digest(s) for s in self._accepted}
            keys = {i: KeyState(**vars(k)) for i, k in self._keys.items()}
            accepted = list(self._accepted)
            for s in doc.statements:
                digest = statement_digest(s)
                if digest in seen:
                    continue
                try:
                    check_statement(keys, s, t)
                except (StatementRefused, KeyFileError) as exc:
                    outcome.refused.append((s, str(exc)))
                    continue
                apply_statement(keys, s)
                accepted.append(s)
                seen.add(digest)
                outcome.accepted.append(s)
            if outcome.accepted:
                previous = self._accepted
                self._accepted = accepted
                try:
                    self._save()
                except OSError:
                    self._accepted = previous  # the last good state stays, on disk and here
                    raise
                self._keys = keys
        return outcome

    def first_refusal(self, statement: TrustStatement) -> bool:
        """True the first time this process sees statement refused (to report it once)."""
        digest = statement_digest(statement)
        with self._lock:
            if digest in self._refused:
                return False
            self._refused.add(digest)
            return True
