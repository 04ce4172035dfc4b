"""The shape of the package: no import cycle, no private name borrowed from another module.

The import graph counts every import of a ``remote_exec`` module, at module level or inside a function
(an import inside a function is a real dependency, only deferred), except those under
``if TYPE_CHECKING:``, which never run. A cycle means the rooms of the package cannot be understood (or
tested, or shipped to the remote) one at a time; the remote side in particular must not reach the
coordinator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "remote_exec"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """(imported module, imported names) of one module, outside ``if TYPE_CHECKING:`` blocks."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str], int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self.found.append((target, [alias.name for alias in node.names], node.lineno))


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports() -> dict[str, list[tuple[str, list[str], int]]]:
    result = {}
    for name, path in _modules().items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        result[name] = visitor.found
    return result


def import_graph() -> dict[str, set[str]]:
    """module -> the remote_exec modules it imports (``from pkg import sub`` counts as importing sub)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, found in _imports().items():
        for target, names, _ in found:
            if target.split(".")[0] != "remote_exec":
                continue
            submodules = [f"{target}.{item}" for item in names if f"{target}.{item}" in modules]
            if submodules:
                graph[name].update(submodules)
                if len(submodules) < len(names) and target in modules:
                    graph[name].add(target)
            elif target in modules:
                graph[name].add(target)
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_name_is_imported_from_another_module() -> None:
    modules = _modules()
    borrowed = []
    for name, found in _imports().items():
        for target, names, line in found:
            if target.split(".")[0] != "remote_exec" or target == name:
                continue
            for item in names:
                if item.startswith("_") and not item.startswith("__") and f"{target}.{item}" not in modules:
                    borrowed.append(f"{modules[name].relative_to(PACKAGE.parent)}:{line} imports {target}.{item}")
    assert not borrowed, "private names borrowed across modules:\n" + "\n".join(borrowed)


def test_the_remote_side_does_not_reach_the_coordinator() -> None:
    """What the runner imports, transitively, stays among the modules that travel (standard library only)."""
    graph = import_graph()
    seen: set[str] = set()
    todo = ["remote_exec.runner"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(graph.get(module, ()))
    coordinator_side = {"remote_exec.coordinator", "remote_exec.cli", "remote_exec.backends", "remote_exec.advices",
                        "remote_exec.workspace", "remote_exec.launchers", "remote_exec.config"}
    reached = sorted(m for m in seen if any(m == c or m.startswith(c + ".") for c in coordinator_side))
    assert not reached, f"the runner reaches coordinator modules: {reached}"


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


def test_no_two_test_modules_share_a_name() -> None:
    """pytest imports test modules by their base name (no packages under tests/): two files of one name
    in different folders stop the whole suite at collection."""
    tests = Path(__file__).resolve().parents[1]
    names: dict[str, list[str]] = {}
    for path in tests.rglob("test_*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(tests)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
