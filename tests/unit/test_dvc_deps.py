"""Every DVC stage lists all the project code its command imports (else `dvc repro` keeps
stale outputs after a change to that code). The imports come from the source (`ast`), so the
check needs no training, no DVC and no Ray."""

from __future__ import annotations

import ast
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

ROOT = REPO
PACKAGES = ("pipeline", "services")
CLI = "pipeline.cli"
STAGE_FILES = ("dvc.yaml", "tune/dvc.yaml")


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(nodes: list[ast.stmt] | ast.AST, root: Path) -> set[str]:
    """Project modules imported anywhere in `nodes` (a `from a import b` may name a module b)."""
    found: set[str] = set()
    for node in ast.walk(
        ast.Module(body=nodes, type_ignores=[]) if isinstance(nodes, list) else nodes
    ):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(root, m)}


def closure(root: Path, modules: set[str]) -> set[str]:
    """`modules`, the packages above them and everything they import, transitively (the CLI's
    imports are the command's, from `command_modules`)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = module_file(root, module)
        assert path is not None, module
        if not module.startswith(CLI):
            todo += _imported(ast.parse(path.read_text()), root)
    return seen


def command_modules(root: Path, command: str) -> set[str]:
    """What `mnist-pipeline <command> ...` imports: the CLI modules and their top-level
    imports, and the imports inside that command's function (each stage is imported lazily)."""
    words = shlex.split(command)
    assert words[0] == "mnist-pipeline", command
    name = words[1].replace("-", "_")
    modules = {CLI} | {f"{CLI}.{path.stem}" for path in (root / "pipeline" / "cli").glob("*.py")}
    modules.discard(f"{CLI}.__init__")
    found, functions = set(modules), []
    for module in modules:
        tree = ast.parse(module_file(root, module).read_text())  # type: ignore[union-attr]
        top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        found |= _imported(top, root)
        functions += [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == name]
    assert len(functions) == 1, f"no single CLI function {name!r} for {command!r}"
    return found | _imported(functions[0], root)


def has_code(path: Path) -> bool:
    """A package `__init__` with only a docstring runs nothing a dep needs to cover."""
    body = ast.parse(path.read_text()).body
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


@dataclass(frozen=True)
class Stage:
    name: str
    command: str
    deps: list[str]
    wdir: Path


def stages(root: Path) -> list[Stage]:
    found = []
    for file in STAGE_FILES:
        for name, stage in yaml.safe_load((root / file).read_text())["stages"].items():
            body = stage.get("do", stage)
            wdir = ((root / file).parent / body.get("wdir", ".")).resolve()
            items = stage.get("foreach", [None])
            for item in items:
                command = body["cmd"].replace("${item}", str(item))
                deps = [d.replace("${item}", str(item)) for d in body.get("deps", [])]
                found.append(
                    Stage(f"{file}:{name}" + (f"@{item}" if item else ""), command, deps, wdir)
                )
    return found


def uncovered(root: Path, stage: Stage) -> list[str]:
    """Project modules the stage's command imports that none of its deps covers."""
    deps = [(stage.wdir / dep).resolve() for dep in stage.deps if not dep.startswith("$")]
    missing = []
    for module in sorted(closure(root, command_modules(root, stage.command))):
        path = module_file(root, module)
        assert path is not None
        if not has_code(path):
            continue
        if not any(path == dep or dep in path.parents for dep in deps):
            missing.append(f"{module} ({path.relative_to(root)})")
    return missing


@pytest.mark.parametrize("stage", stages(ROOT), ids=lambda s: s.name)
def test_stage_deps_cover_the_code_it_imports(stage: Stage) -> None:
    assert not uncovered(ROOT, stage), f"{stage.name} lacks deps for: {uncovered(ROOT, stage)}"


def test_a_new_import_without_a_dep_is_caught(tmp_path: Path) -> None:
    # A copy of the project's code and stage files, with one module the train stage imports.
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    for file in STAGE_FILES:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text((ROOT / file).read_text())
    (tmp_path / "pipeline" / "extra.py").write_text("VALUE = 1\n")
    driver = tmp_path / "pipeline" / "training" / "driver.py"
    driver.write_text(
        driver.read_text().replace("import csv\n", "import csv\n\nimport pipeline.extra\n", 1)
    )
    train = next(s for s in stages(tmp_path) if s.name == "dvc.yaml:train@mlp")
    assert uncovered(tmp_path, train) == ["pipeline.extra (pipeline/extra.py)"]
    fetch = next(s for s in stages(tmp_path) if s.name == "dvc.yaml:fetch")
    assert uncovered(tmp_path, fetch) == []
    # And a dep dropped from the list is caught too.
    dropped = Stage(
        train.name, train.command, [d for d in train.deps if d != "pipeline/models"], train.wdir
    )
    assert "pipeline.models.networks (pipeline/models/networks.py)" in uncovered(tmp_path, dropped)
