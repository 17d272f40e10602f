"""edgefleet: fast early-exit INT8 neural networks on fleets of small devices, kept fast.

The import namespace over the repository's top-level folders: `edgefleet/agent` and
`edgefleet/server` are links to `agent/` and `server/` (docs/decisions.md, "One namespace").
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
