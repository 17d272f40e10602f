"""Broker identity: a credential per device and per coordinator, and the ACL that binds them.

registry (who exists) -> passwd (mosquitto password file) + acl (rules on %u) + pki (the
fleet's broker CA and server certificate), kept together by directory.IdentityDir; brokerconf
renders the mosquitto configuration that uses them; reload signals a running broker.
"""

from edgefleet.server.identity.brokerconf import BrokerConf, render_conf
from edgefleet.server.identity.directory import COORDINATOR, IdentityDir, IdentityError, Issued
from edgefleet.server.identity.reload import ReloadError, reload_broker

__all__ = [
    "COORDINATOR",
    "BrokerConf",
    "IdentityDir",
    "IdentityError",
    "Issued",
    "ReloadError",
    "reload_broker",
    "render_conf",
]
