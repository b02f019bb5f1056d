"""Lineage of a run: the project's git commit and the DVC hash of the data it trained on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.compat.dvc import folder_hash
from pipeline.config.env import Settings


def git_commit() -> str:
    """HEAD's commit, marked `-dirty` when tracked files differ from it; in a Ray job (whose
    upload has no .git) the commit `submit` read where the job was submitted."""
    submitted = Settings().pipeline_git_commit
    if submitted:
        return submitted
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def dvc_hash(folder: Path) -> str:
    """The hash DVC records for `folder` in dvc.lock (`<md5>.dir`)."""
    return folder_hash(folder)
