"""Moved to `edgefleet.server.local.broker`; this import path stays for existing importers."""

from edgefleet.server.local.broker import (
    INSTALL_HINT,
    MosquittoBroker,
    MosquittoNotFound,
    TlsListener,
    find_mosquitto,
)

__all__ = ["INSTALL_HINT", "MosquittoBroker", "MosquittoNotFound", "TlsListener", "find_mosquitto"]
