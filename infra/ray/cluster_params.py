"""Write a copy of params.yaml with a few keys changed for a cluster run, validated.
Mainly `train.storage_path`, shared by every node. Each -S KEY=VALUE sets a dotted key that must
already exist; VALUE is read as YAML (so 4, true, null and [1, 2] keep their types)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml


def apply(params: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"-S {assignment!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node: Any = params
    for depth, part in enumerate(parents):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"-S {key}: no key {'.'.join(parents[: depth + 1])} in the params")
        node = node[part]
    if not isinstance(node, dict) or leaf not in node:
        raise ValueError(f"-S {key}: no such key in the params")
    node[leaf] = yaml.safe_load(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VAL")
    args = parser.parse_args(argv)

    from pipeline.config.params import ParamsError, parse_params

    params = yaml.safe_load(args.params.read_text())
    try:
        for assignment in args.sets:
            apply(params, assignment)
        parse_params(params, source=str(args.out))
    except (ValueError, ParamsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    changes = ", ".join(args.sets) or "no change"
    header = f"# {args.params} with {changes} (written by infra/ray/cluster_params.py)\n"
    args.out.write_text(header + yaml.safe_dump(params, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
