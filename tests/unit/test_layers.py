"""The rule of the arrows (README, Layout): imports run downward only, no module or package
imports one that imports it back, and nothing in `pipeline` imports `services`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ROOT = REPO
# Top to bottom; a module may import its own layer or any layer below it.
LAYERS = (
    ("pipeline.__main__", "pipeline.cli", "services"),
    ("pipeline.tune",),
    ("pipeline.training", "pipeline.evaluate", "pipeline.registry", "pipeline.submit"),
    ("pipeline.tracking",),
    ("pipeline.models", "pipeline.data"),
    ("pipeline.config", "pipeline.compat"),
)


def modules() -> dict[str, Path]:
    found = {}
    for package in ("pipeline", "services"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its file (lazy imports too)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        if module in ("pipeline", "services"):
            continue
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            targets |= {name for name in names if name in known}
        # The top-level packages' own files hold only a docstring.
        graph[module] = targets - {module, "pipeline", "services"}
    return graph


def layer(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and the README")


def package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pipeline" else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_import_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        source = package(module)
        graph.setdefault(source, set()).update(package(t) for t in targets if package(t) != source)
    assert cycles(graph) == []


def test_imports_run_downward() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) < layer(module)
    ]
    assert upward == []


def test_pipeline_never_imports_services() -> None:
    graph = import_graph()
    offenders = [
        m
        for m, targets in graph.items()
        if m.startswith("pipeline") and any(t.startswith("services") for t in targets)
    ]
    assert offenders == []


def test_the_checks_catch_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("pipeline.cli.stages") < layer("pipeline.training.driver")
