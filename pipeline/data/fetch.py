"""Fetch stage: download the four MNIST files from a list of mirrors, verified by SHA-256."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from tqdm import tqdm

from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.data.atomic import atomic_path, is_object_store

log = logging.getLogger(__name__)

# SHA-256 of the decompressed IDX files: what the pipeline trusts, whatever the mirror.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_CHUNK = 1 << 16


class FetchError(RuntimeError):
    """No mirror gave a verified copy of a file; the message lists every attempt."""


def _is_url(mirror: str) -> bool:
    return urlparse(mirror).scheme in {"http", "https", "ftp", "file"}


def _candidates(mirror: str, name: str) -> list[str]:
    """Places a mirror may hold `name`: gzipped first, as the public mirrors serve it."""
    files = (f"{name}.gz", name)
    if _is_url(mirror) or is_object_store(mirror):
        return [f"{mirror.removesuffix('/')}/{file}" for file in files]
    return [str(Path(mirror).expanduser() / file) for file in files]


def _download(source: str, target: Path, timeout_s: float) -> None:
    if _is_url(source):
        request = urllib.request.Request(source, headers={"User-Agent": "mnist-pipeline"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            _copy_with_progress(response, target, total, source)
    elif is_object_store(source):
        import fsspec

        try:
            with fsspec.open(source, "rb") as stream:
                _copy_with_progress(stream, target, getattr(stream, "size", None), source)
        except (ImportError, ValueError) as error:  # no backend for the scheme
            raise OSError(f"cannot read {urlparse(source).scheme}:// ({error})") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError("no such file")
        with path.open("rb") as stream:
            _copy_with_progress(stream, target, path.stat().st_size, source)


def _copy_with_progress(stream: BinaryIO, target: Path, total: int | None, label: str) -> None:
    name = Path(urlparse(label).path).name
    with (
        tqdm.wrapattr(stream, "read", total, desc=name, leave=False, disable=None) as read,
        target.open("wb") as out,
    ):
        shutil.copyfileobj(read, out, _CHUNK)


def _decompress_and_hash(downloaded: Path, gzipped: bool, target: Path) -> str:
    digest = hashlib.sha256()
    opener = gzip.open if gzipped else open
    with opener(downloaded, "rb") as src, target.open("wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch_file(name: str, mirrors: Iterable[str], out_dir: Path, timeout_s: float = 30.0) -> Path:
    """Fetch one verified IDX file into `out_dir`; nothing is left there on failure."""
    expected = MNIST_FILES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    attempts: list[tuple[str, str]] = []  # (source, problem)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        staged = Path(tmp) / name
        for mirror in mirrors:
            for source in _candidates(mirror, name):
                downloaded = Path(tmp) / "download"
                try:
                    _download(source, downloaded, timeout_s)
                    actual = _decompress_and_hash(downloaded, source.endswith(".gz"), staged)
                except (OSError, EOFError, zlib.error, http.client.HTTPException) as error:
                    attempts.append((source, _describe(error)))
                    continue
                if actual == expected:
                    os.replace(staged, out_dir / name)
                    log.info("%s verified from %s", name, source)
                    return out_dir / name
                attempts.append((source, f"SHA-256 mismatch: expected {expected}, got {actual}"))
    lines = [f"  - {source}: {problem}" for source, problem in attempts]
    tried = "\n".join(lines) or "  (no mirrors)"
    raise FetchError(f"could not fetch a verified copy of {name}; tried:\n{tried}")


def _describe(error: BaseException) -> str:
    if isinstance(error, gzip.BadGzipFile | EOFError | zlib.error):
        return f"broken gzip data ({str(error) or 'truncated'})"
    if isinstance(error, FileNotFoundError):
        return "not found"
    return f"{type(error).__name__}: {error}"


def mirror_list(configured: list[str], env_mirror: str | None) -> list[str]:
    """The environment's mirror first, then the configured ones, each once."""
    return list(dict.fromkeys([m for m in (env_mirror, *configured) if m]))


def fetch_all(mirrors: list[str], out_dir: Path, timeout_s: float = 30.0) -> list[Path]:
    """Fetch all four files; they replace `out_dir`'s content only once every one is verified."""
    with atomic_path(out_dir) as staged:
        for name in MNIST_FILES:
            fetch_file(name, mirrors, staged, timeout_s)
    return [out_dir / name for name in MNIST_FILES]


def run(params: Params, settings: Settings) -> list[Path]:
    mirrors = mirror_list(params.fetch.mirrors, settings.mnist_mirror)
    return fetch_all(mirrors, Path(params.paths.raw), params.fetch.timeout_s)
