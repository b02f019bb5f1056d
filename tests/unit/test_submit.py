"""What a Ray job uploads: every project source file, none of the outputs or environments.

Ray matches `excludes` as gitignore patterns (pathspec's gitwildmatch), as checked here."""

from __future__ import annotations

import subprocess

from pathspec import PathSpec

from pipeline.submit import EXCLUDES
from tests.conftest import REPO


def test_the_upload_keeps_every_tracked_source_file() -> None:
    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    left_out = [path for path in tracked if path.endswith(".py") and spec.match_file(path)]
    assert left_out == []


def test_the_upload_leaves_out_outputs_and_environments() -> None:
    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    for path in ("data/raw/x", "models/cnn/model.pt", ".venv/bin/python", "mlruns/0/m.yaml"):
        assert spec.match_file(path), path
    for path in ("pipeline/data/fetch.py", "pipeline/models/networks.py", "params.yaml"):
        assert not spec.match_file(path), path
