"""Lineage of a run: the project's git commit (the data's DVC hash: `pipeline.compat.dvc`)."""

from __future__ import annotations

import subprocess

from pipeline.config.env import Settings


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def git_commit() -> str:
    """HEAD's commit (`-dirty` when tracked files differ); in a Ray job, whose upload has no
    .git, the commit `submit` read."""
    submitted = Settings().pipeline_git_commit
    if submitted:
        return submitted
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit
