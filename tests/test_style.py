"""The shape of the code a reader meets: short functions, short modules, imports that run one way.

Line width and format are ruff's (`ruff check .`, `ruff format --check .`); these are the limits
ruff does not check. Run alone: `python -m pytest tests/test_style.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("cnnjax", "experiments", "benchmarks", "tests")
MODULE_LINES = 450
FUNCTION_LINES = 100
# The one loop a reader finds reads top to bottom in one function, as flax's train_and_evaluate.
LONGER_FUNCTIONS = {("cnnjax/train.py", "train_and_evaluate"): 160}


def python_files() -> list[Path]:
    return sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every cnnjax module `path` imports, at any depth: top level, in functions, under
    TYPE_CHECKING. `from pkg import name` counts as pkg.name when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the import graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_modules_and_functions_are_short():
    too_long = []
    for path in python_files():
        name = path.relative_to(ROOT).as_posix()
        source = path.read_text()
        if (lines := len(source.splitlines())) > MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGER_FUNCTIONS.get((name, node.name), FUNCTION_LINES):
                    too_long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_the_library_imports_have_no_cycle():
    paths = {module_name(p): p for p in (ROOT / "cnnjax").rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}
    assert len(graph) > 10 and graph["cnnjax.config"], "the graph reads the imports"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
