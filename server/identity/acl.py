"""The broker's ACL, rendered from the identity registry (mosquitto acl_file syntax).

Devices get `pattern` rules on `%u`: with `use_username_as_clientid` the username is also the
client id, and provisioning makes it the device id, so `%u` names the device's own topics.
A device's group is not something a pattern can know, so each grouped device gets a `user`
block reading its group's cmd. Coordinators get the whole tree.
"""

from __future__ import annotations

from edgefleet.agent.protocol.topics import DEFAULT_ROOT
from edgefleet.server.identity.registry import Registry

HEADER = (
    "# edgefleet broker ACL: rewritten by `edgefleet fleet provision` and `fleet revoke`;\n"
    "# edits by hand are lost. Anything not granted here is denied.\n"
)

# What every device may do with its own identity (the MQTT topic tree of agent/protocol).
DEVICE_PATTERNS = (
    ("write", "dev/%u/status"),
    ("write", "dev/%u/telemetry"),
    ("write", "dev/%u/results"),
    ("write", "dev/%u/events"),
    ("write", "dev/%u/reply"),
    ("read", "dev/%u/cmd"),
    ("read", "bundle/#"),  # transfers: offers and chunks serve every device
    ("read", "fed/+/task"),  # federated rounds: tasks are for all ...
    ("write", "fed/+/update/%u"),  # ... updates only one's own (and no one else's readable)
    ("read", "keys/trust"),  # the fleet key statements: signed, but only coordinators write
)


def render_acl(registry: Registry, root: str = DEFAULT_ROOT) -> str:
    """The acl_file text for every identity of the registry under topic root."""
    lines = [HEADER, "# Devices: write their own topics, read their own cmd (group cmd: below)."]
    lines += [f"pattern {access} {root}/{topic}" for access, topic in DEVICE_PATTERNS]
    for name, ident in sorted(registry.identities.items()):
        if ident.role == "coordinator":
            lines += ["", f"user {name}", f"topic readwrite {root}/#"]
        elif ident.group is not None:
            lines += ["", f"user {name}", f"topic read {root}/group/{ident.group}/cmd"]
    return "\n".join(lines) + "\n"
