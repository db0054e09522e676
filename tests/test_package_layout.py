"""The package's shape: no module imports itself back through another (DESIGN.md's data path
runs one way)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastcifar

PACKAGE = Path(fastcifar.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    """fastcifar module -> the fastcifar modules it imports, anywhere in its file (imports
    inside functions and under TYPE_CHECKING included: a circle there is still a circle)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        imported = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastcifar"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("fastcifar"))
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return groups


def test_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_itself_back():
    assert _circles(_import_graph()) == []


# The house's size limits: a module holds one job, a function fits on a screen.
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _long_functions(source: str, limit: int) -> list[str]:
    """Names of the functions in `source` longer than `limit` lines (signature included)."""
    return [node.name for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > limit]


def test_long_function_finder_counts_the_signature():
    source = "def short():\n    pass\n\n\ndef long(\n    a,\n    b,\n):\n    return a\n"
    assert _long_functions(source, 4) == ["long"]
    assert _long_functions(source, 5) == []


def test_no_module_over_450_lines_and_no_function_over_80():
    modules = {path.relative_to(PACKAGE.parent): path.read_text() for path in PACKAGE.rglob("*.py")}
    assert {str(path): len(text.splitlines()) for path, text in modules.items()
            if len(text.splitlines()) > MAX_MODULE_LINES} == {}
    assert {str(path): names for path, text in modules.items()
            if (names := _long_functions(text, MAX_FUNCTION_LINES))} == {}
