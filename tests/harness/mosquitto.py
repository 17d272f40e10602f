"""The test broker is the product's own local broker launcher."""

from edgefleet.server.localbroker import INSTALL_HINT, MosquittoBroker, MosquittoNotFound

__all__ = ["INSTALL_HINT", "MosquittoBroker", "MosquittoNotFound"]
