"""edgefleet agent: runs verified early-exit models on a device and reports over MQTT."""

from edgefleet import __version__

__all__ = ["__version__"]
