"""The house's layering (#15): no import cycle among unlearnops modules, and no module imports one
above it. Read statically (tests/import_graph.py), so a violation is found without running it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_graph import all_modules, module_graph, module_imports  # noqa: E402

# Upper floors: the command line, the DVC stages' entry point and body, the operations code, the report.
ABOVE = {
    "unlearnops.layout": ("unlearnops.pipeline", "unlearnops.stages", "unlearnops.cli", "unlearnops.ops", "unlearnops.report"),
    "unlearnops.config": ("unlearnops.pipeline", "unlearnops.stages", "unlearnops.cli", "unlearnops.ops", "unlearnops.report"),
    "unlearnops.files": ("unlearnops.pipeline", "unlearnops.stages", "unlearnops.cli", "unlearnops.ops", "unlearnops.report"),
    "unlearnops.report": ("unlearnops.pipeline", "unlearnops.stages", "unlearnops.cli", "unlearnops.ops"),
    "unlearnops.methods": ("unlearnops.pipeline", "unlearnops.stages", "unlearnops.cli", "unlearnops.ops", "unlearnops.report"),
    "unlearnops.metrics": ("unlearnops.pipeline", "unlearnops.stages", "unlearnops.cli", "unlearnops.ops", "unlearnops.report"),
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state, path = [], {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle_among_module_level_imports():
    graph = {m: {n for n in deps if not _within(m, n)} for m, deps in module_graph().items()}  # a package's own __init__ runs first anyway
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("lower", sorted(ABOVE))
def test_no_module_imports_one_above_it(lower):
    """Function-local imports count too: a lazy import up the house is still a dependency up it."""
    bad = []
    for module in all_modules():
        if _within(module, lower):
            for imported in sorted(module_imports(module).all):
                if any(_within(imported, upper) for upper in ABOVE[lower]):
                    bad.append(f"{module} imports {imported}")
    assert bad == []
