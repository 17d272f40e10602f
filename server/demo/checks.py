"""What the demo claims, checked: each claim passes or fails with a reason; any failure fails it.

A demo that prints "0 missing" but exits 0 whatever it saw proves nothing; here every
statement the story makes about the run is a named check, the summary lists them all, and
any failure makes `edgefleet demo` exit 1 with one `FAILED: <check>: <why>` line per failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """One claim about this run and what was seen."""

    name: str
    ok: bool
    detail: str


class StepFailed(Exception):
    """A check that later steps depend on failed: the demo stops after the summary."""


class Checks:
    """The checks of one run, in the order they were made."""

    def __init__(self) -> None:
        self.items: list[Check] = []

    def check(self, name: str, ok: bool, detail: str) -> bool:
        """Record a claim and whether it held; returns ok."""
        self.items.append(Check(name, bool(ok), detail))
        return bool(ok)

    def require(self, name: str, ok: bool, detail: str) -> None:
        """Record a claim that the next steps need; raise StepFailed when it does not hold."""
        if not self.check(name, ok, detail):
            raise StepFailed(f"{name}: {detail}")

    @property
    def passed(self) -> bool:
        """True when at least one check ran and none failed."""
        return bool(self.items) and not self.failed

    @property
    def failed(self) -> list[Check]:
        """The checks that did not hold."""
        return [c for c in self.items if not c.ok]

    def lines(self) -> list[str]:
        """One line per check: pass or FAIL, its name, what was seen."""
        width = max((len(c.name) for c in self.items), default=0)
        return [
            f"  {'pass' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in self.items
        ]

    def verdict(self) -> list[str]:
        """The closing line: all passed, or one `FAILED: <check>: <why>` line per failure."""
        if not self.items:
            return ["FAILED: no check ran"]
        if self.failed:
            return [f"FAILED: {c.name}: {c.detail}" for c in self.failed]
        return [f"All {len(self.items)} checks passed."]

    def as_dicts(self) -> list[dict[str, Any]]:
        """JSON-ready list, for the report."""
        return [asdict(c) for c in self.items]
