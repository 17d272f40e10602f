"""edgefleet agent: runs verified early-exit models on a device and reports over MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
