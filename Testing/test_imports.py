"""The library's rooms import downwards only: no import cycle among ``ConvLoRASegLib``'s modules, counting imports
inside functions too (a lazy import still ties two modules together), and no library module imports the CLI.

The graph is read from the source with :mod:`ast`, nothing is imported: ``from .x import ...``,
``from . import x``, ``from ConvLoRASegLib.x import ...`` and ``import ConvLoRASegLib.x`` anywhere in a module
(top level, functions, ``if TYPE_CHECKING:`` blocks) are edges.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = "ConvLoRASegLib"
LIB = Path(__file__).resolve().parents[1] / PACKAGE
#: Modules nothing in the library may import (the command line sits on top of everything).
TOP_ONLY = {"cli", "__main__"}


def module_names() -> Set[str]:
    return {p.stem for p in LIB.glob("*.py")}


def imports_of(path: Path, modules: Set[str]) -> Set[str]:
    """The library modules ``path`` imports anywhere in its body (``__init__`` for the package itself)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
            elif node.level == 0 and node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module[len(PACKAGE) + 1:]
            else:
                continue
            first = base.split(".")[0]
            if first:
                found.add(first if first in modules else "__init__")
            else:  # ``from . import x, y``: submodules, or names of the package's __init__
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    first = alias.name[len(PACKAGE) + 1:].split(".")[0]
                    found.add(first if first in modules else "__init__")
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = module_names()
    return {p.stem: imports_of(p, modules) - {p.stem} for p in sorted(LIB.glob("*.py"))}


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a readable path."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: Dict[str, Set[str]], comp: Set[str]) -> List[str]:
    start = min(comp)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in comp)
        back = [w for w in nxt if w in seen]
        if back:
            return path[path.index(back[0]):] + [back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


def test_the_graph_is_read():
    graph = import_graph()
    assert "errors" in graph["volumes"] and "segment" in graph["selftrain"]
    assert "selftrain" in graph["batch"]  # an import inside a function counts


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in ConvLoRASegLib: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_library_module_imports_the_cli():
    offenders = sorted(m for m, deps in import_graph().items() if m not in TOP_ONLY and deps & TOP_ONLY)
    assert not offenders, f"library modules importing the CLI: {offenders}"


def test_the_cycle_finder_finds_lazy_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
