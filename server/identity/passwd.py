"""Per-device broker passwords: random secrets and mosquitto's password-file format.

mosquitto 2.0 reads `name:$7$<iterations>$<salt b64>$<PBKDF2-SHA512 b64>` lines (what
`mosquitto_passwd` writes), so the file is written here with hashlib and no extra tool.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from pathlib import Path

from edgefleet.server.identity.files import write_private

# mosquitto_passwd's own default. Key stretching protects guessable human passwords; ours are
# 256 random bits, so more rounds would only slow every device's CONNECT (a reconnect storm).
ITERATIONS = 101
SALT_BYTES = 12  # what mosquitto_passwd uses
SECRET_BYTES = 32


class PasswordFileError(ValueError):
    """A password file line is not in mosquitto's format; the message names file and line."""


def new_secret() -> str:
    """A fresh device password: 256 random bits, URL-safe so it survives any shell or file."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The `$7$` (PBKDF2-SHA512) hash mosquitto 2.0 verifies."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when password matches a `$7$` hash (constant-time comparison)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    salt = base64.b64decode(parts[3])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(base64.b64encode(digest).decode(), parts[4])


def read_password_file(path: Path) -> dict[str, str]:
    """Username -> hash of a mosquitto password file; a missing file is empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not name or not hashed.startswith("$"):
            raise PasswordFileError(f"{path}:{number}: not a 'name:$hash' line")
        entries[name] = hashed
    return entries


def write_password_file(path: Path, entries: dict[str, str]) -> None:
    """Replace the password file atomically, mode 0600 (hashes are still secrets)."""
    body = "".join(f"{name}:{hashed}\n" for name, hashed in sorted(entries.items()))
    write_private(path, body)
