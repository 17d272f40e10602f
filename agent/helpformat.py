"""The `--help` style of the three console scripts: every option says its default.

Shared by `edgefleet-agent`, `edgefleet-server` and `edgefleet` (the server may import it: it is
plain argparse, no agent state). argparse's own ArgumentDefaultsHelpFormatter also prints
"(default: None)" and "(default: False)" for options that have no default worth naming, and
its formatter class is not inherited by subcommands; `CliParser` fixes both.
"""

from __future__ import annotations

import argparse
from typing import Any


def has_default(action: argparse.Action) -> bool:
    """Whether the option has a default worth showing (not None, a flag's False, or hidden)."""
    if isinstance(action, argparse._SubParsersAction) or action.default is argparse.SUPPRESS:
        return False
    if action.default is None or isinstance(action.default, bool):
        return False
    return bool(action.option_strings) or action.nargs in ("?", "*")


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        # An author who wrote the default in words ("(default: 1/255)") knows it better.
        if not has_default(action) or "%(default)" in text or "(default" in text:
            return action.help
        return f"{text} (default: %(default)s)"


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose subcommands (same class, as argparse makes them) share HelpFormatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def walk(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """(prog, parser) of a parser and of every subcommand below it, depth first."""
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
                found += walk(child)
    return found
