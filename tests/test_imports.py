"""The package's imports run one way: data -> model -> training -> analysis -> reporting -> CLI.

The graph is read from the source (every import statement, inside functions too, except those only
for type checkers), so a cycle hidden in a function-local import counts.  The commands that work on a
finished run must not load the training loop, at import time or through any import of theirs.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"hypersort_core": ROOT / "hypersort_core", "hypersort_core.kernels": ROOT / "kernels", "hypersort_core.cli": ROOT / "cli"}
TRAINING_LOOP = "hypersort_core.train"
AFTER_TRAINING = ("hypersort_core.predict", "hypersort_core.export", "hypersort_core.analysis", "hypersort_core.report", "hypersort_core.styles")


def _module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module `module` imports, as absolute names: `from a import b` is a.b where b is a module, else a."""
    found: set[str] = set()
    modules = set(module_files())
    base = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = child.module or ""
                if child.level:
                    anchor = base.split(".")[: len(base.split(".")) - child.level + 1]
                    source = ".".join([*anchor, *([source] if source else [])])
                submodules = {f"{source}.{alias.name}" for alias in child.names} & modules
                found.update(submodules if len(submodules) == len(child.names) else {source, *submodules})
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@functools.cache
def module_files() -> dict[str, Path]:
    return _module_files()


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for name, path in files.items():
        names = imported_names(path, name, path.name == "__init__.py")
        graph[name] = {target for target in names if target in files and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            connect(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "hypersort_core.data.cache" in graph and "hypersort_core.kernels" in graph and "hypersort_core.cli.main" in graph
    # The package root only re-exports (its API is loaded lazily); a cycle through it would be a real one.
    assert cycles(graph) == []


def test_the_graph_sees_a_cycle_hidden_in_a_function(tmp_path):
    """The detector itself: two modules importing each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("import hypersort_core.b\n")
    (tmp_path / "b.py").write_text("def later():\n    from hypersort_core.a import x\n")
    graph = {
        name: {t for t in imported_names(tmp_path / f"{name[-1]}.py", name, False) if t in ("hypersort_core.a", "hypersort_core.b") and t != name}
        for name in ("hypersort_core.a", "hypersort_core.b")
    }
    assert cycles(graph) == [["hypersort_core.a", "hypersort_core.b"]]


@pytest.mark.parametrize("module", AFTER_TRAINING)
def test_commands_on_a_finished_run_do_not_import_the_training_loop(module):
    graph = import_graph()
    assert TRAINING_LOOP not in reachable(graph, module)


def test_loading_a_run_and_predicting_leaves_the_training_loop_unloaded():
    """At run time too: importing what predict, export and analyze use never loads train.py."""
    code = "import sys\n" + "".join(f"import {name}\n" for name in AFTER_TRAINING) + f"print({TRAINING_LOOP!r} in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"
