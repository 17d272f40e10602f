"""A contract type for import-linter: no module may end up importing itself.

import-linter's own `acyclic_siblings` compares sibling packages; it does not see a package's
`__init__` and one of its own modules importing each other, which is where this project's
cycles hid (behind function-level imports, which grimp counts as imports all the same).
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class AcyclicModulesContract(Contract):
    """Every import chain between the root package's modules runs one way."""

    type_name = "acyclic_modules"
    ignore_imports = fields.SetField(subfield=fields.ImportExpressionField(), required=False)

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        """Find, for every direct import a -> b, a chain from b back to a."""
        cycles: list[list[str]] = []
        seen: set[frozenset[str]] = set()
        for importer in sorted(graph.modules):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                if back is None or frozenset(back) in seen:
                    continue
                seen.add(frozenset(back))
                cycles.append([importer, *back])
        return ContractCheck(kept=not cycles, warnings=None, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        """One line per cycle, as a chain that ends where it started."""
        for cycle in check.metadata["cycles"]:
            output.print_error(" -> ".join(cycle), bold=False)
            output.new_line()
