"""The error a subcommand raises for a mistake the user can fix."""

from __future__ import annotations


class CliError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""
