"""`edgefleet`: the operator's command line.

The parser and entry point live in app.py (console script `edgefleet.server.cli:main`); the
subcommands each in their own module, which import nothing back from here.
"""

from .app import build_parser, main
from .errors import CliError

__all__ = ["CliError", "build_parser", "main"]
