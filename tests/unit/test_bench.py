"""The benchmarks (bench/): every module imports, every benchmark answers `--help` as
`python -m` from the repo root, and the one report renderer writes the expected markdown.
Cheap: nothing trains, serves or measures."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import header, section, table, target, write
from tests.conftest import REPO

MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for path in (REPO / "bench").rglob("*.py")
)
BENCHMARKS = [
    "bench.training.run",
    "bench.serving.run",
    "bench.pipeline",
    "bench.accuracy",
    "bench.gpu",
    "bench.image_upload",
    "bench.train_run",  # not a benchmark: the fresh process the training ones run
]


@pytest.mark.parametrize("module", MODULES)
def test_every_bench_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_every_benchmark_answers_help_as_a_module_of_the_repo() -> None:
    command = [sys.executable, "-m"]
    runs = {
        module: subprocess.Popen(
            [*command, module, "--help"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for module in BENCHMARKS
    }
    for module, process in runs.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{module}: {err.decode()[-2000:]}"
        assert out.startswith(b"usage:"), module


def test_no_bench_module_edits_sys_path() -> None:
    for path in (REPO / "bench").rglob("*.py"):
        assert "sys.path" not in path.read_text(), path


def test_a_table_aligns_formatted_columns_right_and_dashes_missing_values() -> None:
    rows = [{"name": "ours", "p99_ms": 7.181, "rps": 1477.8}, {"name": "mlflow", "p99_ms": None}]
    assert table(rows, "server={name} | p99 ms={p99_ms:.2f} | req/s={rps:,.1f}") == [
        "| server | p99 ms | req/s |",
        "| --- | ---: | ---: |",
        "| ours | 7.18 | 1,477.8 |",
        "| mlflow | - | - |",
        "",
    ]


def test_targets_render_as_pass_or_miss_and_an_empty_list_as_nothing() -> None:
    found = [target("p99 <= 10 ms", "7.18 ms", True, 7.18), target("ratio >= 2x", "1.79x", False)]
    assert section("Targets", found) == [
        "## Targets",
        "",
        "- **PASS** p99 <= 10 ms: 7.18 ms",
        "- **MISS** ratio >= 2x: 1.79x",
        "",
    ]
    assert section("Notes", []) == []


def test_write_puts_the_report_in_json_and_the_parts_targets_and_notes_in_markdown(
    tmp_path: Path,
) -> None:
    env = {"cpu": "CPU", "cpus": 2, "memory_gib": 8.0, "load": "0.10", "commit": "commit abc"}
    report = {"started": "now", "argv": ["--quick"], "environment": env | {"versions": {"x": "1"}}}
    report |= {"targets": [target("t", "m", True)], "notes": ["disturbed"]}
    write("x", report, [header("Title", "bench.x", report), "body"], tmp_path)
    assert json.loads((tmp_path / "x.json").read_text())["notes"] == ["disturbed"]
    assert (tmp_path / "x.md").read_text().splitlines() == [
        "# Title",
        "",
        "Run now by `python -m bench.x --quick`, commit abc, on CPU (2 CPUs, 8.0 GiB), load "
        "0.10; x 1.",
        "",
        "body",
        "## Targets",
        "",
        "- **PASS** t: m",
        "",
        "## Notes",
        "",
        "- disturbed",
    ]
