"""Ed25519 fleet keys: create, store (private key 0600), load, sign, verify."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgefleet.agent.durable import write_atomic

SIGNATURE_SIZE = 64


class KeyFileError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable fingerprint of a public key (first 16 hex of sha256 of the raw key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_private_key() -> Ed25519PrivateKey:
    """A new random fleet signing key."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the private key as PKCS#8 PEM, mode 0600, atomically; refuses to overwrite."""
    if path.exists():
        raise KeyFileError(f"{path}: exists; refusing to overwrite a signing key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem, 0o600)


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as SubjectPublicKeyInfo PEM, the exportable form."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    """Write the public key as PEM, mode 0644, atomically."""
    write_atomic(path, public_key_pem(key), 0o644)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Read a PEM private key and check that it is Ed25519."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read private key: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: private key is {type(key).__name__}, expected Ed25519")
    return key


def parse_public_key(data: bytes, source: str) -> Ed25519PublicKey:
    """Parse a PEM public key, or 32 raw bytes in base64 (one line), naming the source on error."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{source}: not an Ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{source}: public key is {type(key).__name__}, expected Ed25519")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Read a public key file (PEM or base64 raw)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read public key: {exc.strerror}") from exc
    return parse_public_key(data, str(path))


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes) of the exact message bytes."""
    return key.sign(message)


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when the signature is valid for the message under this key."""
    if len(signature) != SIGNATURE_SIZE:
        return False
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
