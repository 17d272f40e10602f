"""edgefleet coordinator: fleet registry, optimizer, rollouts and the operator CLI."""

from agent import __version__

__all__ = ["__version__"]
