"""edgefleet coordinator: fleet registry, optimizer, rollouts and the operator CLI."""

from edgefleet.agent import __version__

__all__ = ["__version__"]
