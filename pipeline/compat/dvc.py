"""DVC internals the project relies on, each with why, the upstream link and a version guard.
`folder_hash`: the `<md5>.dir` hash DVC records for a folder in dvc.lock, for folders DVC does
not track (a test's prepared data, a Ray job's upload without .git). `dvc.api` has no hashing
function (https://github.com/iterative/dvc/issues/4593 asks for one); DVC itself computes it
with dvc-data's `build`, called here the same way."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.compat.versions import require

DVC_DATA = ("dvc-data", "3.16", "4")


def folder_hash(folder: Path) -> str:
    """The hash DVC records for `folder` in dvc.lock (`<md5>.dir`), computed the same way."""
    require(*DVC_DATA)
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(LocalHashFileDB(fs, scratch), str(folder), fs, "md5", dry_run=True)
    return str(obj.hash_info.value)
