"""The benchmarks' one renderer: environment line, tables, targets, notes, results files."""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def table(rows: Iterable[Mapping[str, Any]], spec: str) -> list[str]:
    """A markdown table: `spec` is `header=template | ...`, templates `str.format` a row."""
    columns = [column.split("=", 1) for column in spec.split(" | ")]
    lines = ["| " + " | ".join(header for header, _ in columns) + " |"]
    lines.append("| " + " | ".join("---:" if ":" in t else "---" for _, t in columns) + " |")
    for row in rows:
        cells = []
        for _, template in columns:
            try:
                cells.append(template.format_map(row))
            except (KeyError, TypeError):  # a value missing, or None
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def target(text: str, measured: str, holds: bool, value: float | None = None) -> dict[str, Any]:
    return {"target": text, "measured": measured, "value": value, "holds": holds}


def section(title: str, items: Iterable[str | Mapping[str, Any]]) -> list[str]:
    """`## title` and a list of `items`, a target as PASS/MISS (nothing when there are none)."""
    lines = [
        f"- **{'PASS' if i['holds'] else 'MISS'}** {i['target']}: {i['measured']}"
        if isinstance(i, Mapping)
        else f"- {i}"
        for i in items
    ]
    return [f"## {title}", "", *lines, ""] if lines else []


def header(title: str, module: str, report: Mapping[str, Any]) -> str:
    env, command = report["environment"], " ".join([f"python -m {module}", *report["argv"]])
    machine = f"{env['cpu']} ({env['cpus']} CPUs, {env['memory_gib']} GiB), load {env['load']}"
    versions = ", ".join(f"{name} {v}" for name, v in env["versions"].items())
    started = f"Run {report['started']} by `{command}`, {env['commit']}"
    return f"# {title}\n\n{started}, on {machine}; {versions}.\n"


def write(name: str, report: Mapping[str, Any], parts: list[str], out_dir: Path) -> None:
    """`<name>.json` (the report) and `<name>.md` (`parts`, the targets, the notes)."""
    parts = parts + section("Targets", report.get("targets", []))
    text = "\n".join(parts + section("Notes", report.get("notes", []))).rstrip("\n") + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(text)
    print(f"{text}\n[bench] wrote {out_dir / name}.json and .md", flush=True)
