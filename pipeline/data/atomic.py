"""Where outputs go: atomic local files (readers see the old content or the new, never half of
one), and object-store URIs told apart from paths."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (for a file or a folder), renamed over `target` if the
    block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    staged = tmp_root / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            # A folder cannot be renamed over a non-empty one: move the old aside first.
            old = tmp_root / ".old"
            os.replace(target, old)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def is_object_store(uri: str) -> bool:
    """s3://, gs://, az://, ... (not http, ftp or file): read and written through fsspec/pyarrow."""
    scheme = urlparse(uri).scheme
    # One letter: a Windows drive.
    return len(scheme) > 1 and scheme not in {"http", "https", "ftp", "file"}
