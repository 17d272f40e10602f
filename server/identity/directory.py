"""The broker's identity directory: CA, server certificate, password file, ACL and registry.

Provisioning and revocation change the registry and rewrite the password file and the ACL from
it in one step; the broker picks both up on its next reload (SIGHUP, see reload.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.protocol.ids import check_id
from edgefleet.agent.protocol.topics import DEFAULT_ROOT
from edgefleet.server.identity.acl import render_acl
from edgefleet.server.identity.files import write_private
from edgefleet.server.identity.passwd import (
    hash_password,
    new_secret,
    read_password_file,
    write_password_file,
)
from edgefleet.server.identity.pki import issue_server_cert, make_ca
from edgefleet.server.identity.registry import (
    Identity,
    Registry,
    Role,
    load_registry,
    save_registry,
)

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"


class IdentityError(ValueError):
    """A provisioning request that cannot be done; the message says why."""


@dataclass(frozen=True)
class Issued:
    """What provisioning gives the installer: the username and, once, its password."""

    username: str
    password: str | None  # None: the identity existed and kept its password
    role: Role
    group: str | None
    ca: Path


def default_hosts() -> list[str]:
    """Names the broker certificate covers unless told: this host and loopback."""
    return sorted({socket.getfqdn(), socket.gethostname(), "localhost", "127.0.0.1"})


class IdentityDir:
    """One broker's identity files, in a directory only its owner (and the broker) reads."""

    def __init__(self, directory: Path, root: str = DEFAULT_ROOT) -> None:
        self.directory = directory
        self.root = root
        self.ca = directory / "ca.pem"  # what devices hold to verify the broker
        self.ca_key = directory / "ca.key"
        self.cert = directory / "broker.pem"
        self.key = directory / "broker.key"
        self.passwd = directory / "passwd"
        self.acl = directory / "acl"
        self.registry_path = directory / "identities.json"

    def init(self, hosts: Sequence[str] | None = None) -> bool:
        """Create the CA, the broker certificate and empty password file and ACL if absent."""
        created = False
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.ca_key.exists():
            make_ca(self.ca, self.ca_key)
            created = True
        if not self.key.exists():
            issue_server_cert(self.ca, self.ca_key, self.cert, self.key, hosts or default_hosts())
            created = True
        if not self.passwd.exists() or not self.acl.exists():
            self._write(self.registry(), read_password_file(self.passwd))
            created = True
        if created:
            log.info("broker identity directory %s initialised", self.directory)
        return created

    def registry(self) -> Registry:
        """Every identity provisioned so far."""
        return load_registry(self.registry_path)

    def provision(
        self, name: str, *, role: Role = "device", group: str | None = None, rotate: bool = False
    ) -> Issued:
        """Add an identity (or change its group); a new password only when new or rotate."""
        check_id(name, f"{role} name")
        if group is not None:
            check_id(group, "group name")
        if role == "coordinator" and group is not None:
            raise IdentityError("a coordinator has no group: it reads and writes the whole tree")
        self.init()
        registry = self.registry()
        passwords = read_password_file(self.passwd)
        known = registry.identities.get(name)
        if known is not None and known.role != role:
            raise IdentityError(f"{name!r} is already provisioned as a {known.role}")
        password = None
        if known is None or rotate or name not in passwords:
            password = new_secret()
            passwords[name] = hash_password(password)
        registry.identities[name] = Identity(role=role, group=group)
        self._write(registry, passwords)
        log.info("provisioned %s %s (group %s, %s)", role, name, group or "-",
                 "new password" if password else "password kept")  # fmt: skip
        return Issued(name, password, role, group, self.ca)

    def revoke(self, name: str) -> Identity:
        """Remove an identity's password and ACL entries; raise if it is unknown."""
        registry = self.registry()
        passwords = read_password_file(self.passwd)
        ident = registry.identities.pop(name, None)
        if ident is None and name not in passwords:
            raise IdentityError(f"no identity {name!r} in {self.registry_path}")
        passwords.pop(name, None)
        self._write(registry, passwords)
        log.info("revoked %s", name)
        return ident or Identity(role="device")

    def _write(self, registry: Registry, passwords: dict[str, str]) -> None:
        # Password file before ACL before registry: a crash in between leaves at worst a known
        # identity without rights, never rights for someone who can no longer be revoked.
        write_password_file(self.passwd, {n: h for n, h in passwords.items()
                                          if n in registry.identities})  # fmt: skip
        write_private(self.acl, render_acl(registry, self.root))
        save_registry(self.registry_path, registry)
