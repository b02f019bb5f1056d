"""The fetch stage on real MNIST files: verification, fallback, clean failure."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import http.server
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.fetch import MNIST_FILES, FetchError, fetch_all, fetch_file, mirror_list
from tests.conftest import raw_params, with_overrides

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
UNREACHABLE_URL = "http://127.0.0.1:9/"  # the discard port: nothing listens there


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(folder: Path) -> list[str]:
    """Every entry of `folder`, hidden ones included, sorted; none if it does not exist."""
    return sorted(entry.name for entry in folder.iterdir()) if folder.exists() else []


def decompressed(mirror: Path, name: str) -> bytes:
    return gzip.decompress((mirror / f"{name}.gz").read_bytes())


def write_flipped(mirror: Path, name: str, folder: Path) -> str:
    """A gzipped copy of `name` with one content byte flipped; returns its SHA-256."""
    data = bytearray(decompressed(mirror, name))
    data[len(data) // 2] ^= 0xFF
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.gz").write_bytes(gzip.compress(bytes(data), compresslevel=1))
    return sha256_of(bytes(data))


def write_truncated_gzip(mirror: Path, name: str, folder: Path) -> Path:
    """The first half of the mirror's gzip stream: a broken file."""
    gz = (mirror / f"{name}.gz").read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.gz"
    target.write_bytes(gz[: len(gz) // 2])
    return target


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder over HTTP without logging each request to stderr."""

    def log_message(self, format: str, *args: object) -> None:
        pass


class NotHttpHandler(socketserver.BaseRequestHandler):
    """Answers any request with bytes that are not an HTTP response."""

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"this is not HTTP\r\n\r\n")


@contextmanager
def serving(server: socketserver.TCPServer) -> Iterator[str]:
    """Run `server` on a thread; yield its loopback base URL."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback URLs must be tried directly, never through a proxy of the environment."""
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


def test_fetch_all_from_folder_mirror_is_verified_and_clean(mirror: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "raw"
    # A staging folder left by an interrupted earlier run is swept away by a successful fetch.
    (out_dir / ".fetch-stale").mkdir(parents=True)
    (out_dir / ".fetch-stale" / "download").write_bytes(b"partial")

    fetched = fetch_all([str(mirror)], out_dir, timeout_s=5)

    assert [path.name for path in fetched] == list(MNIST_FILES)
    assert all(path.parent == out_dir for path in fetched)
    assert listing(out_dir) == sorted(MNIST_FILES)
    for name, expected in MNIST_FILES.items():
        assert sha256_of((out_dir / name).read_bytes()) == expected, name
    # The IDX payloads are the real ones: image files hold 28x28 bytes per image.
    assert (out_dir / TRAIN_IMAGES).stat().st_size == 16 + 60_000 * 28 * 28
    assert (out_dir / TEST_LABELS).stat().st_size == 8 + 10_000


@pytest.mark.parametrize("name", [TRAIN_LABELS, TEST_LABELS])
def test_uncompressed_mirror_files_are_accepted(mirror: Path, tmp_path: Path, name: str) -> None:
    plain = tmp_path / "plain-mirror"
    plain.mkdir()
    (plain / name).write_bytes(decompressed(mirror, name))
    out_dir = tmp_path / "raw"

    path = fetch_file(name, [str(plain)], out_dir, timeout_s=5)

    assert path == out_dir / name
    assert sha256_of(path.read_bytes()) == MNIST_FILES[name]
    assert listing(out_dir) == [name]


def test_file_url_mirror_is_accepted(mirror: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "raw"

    path = fetch_file(TEST_LABELS, [mirror.as_uri()], out_dir, timeout_s=5)

    assert sha256_of(path.read_bytes()) == MNIST_FILES[TEST_LABELS]
    assert listing(out_dir) == [TEST_LABELS]


def test_http_mirror_serving_uncompressed_files(mirror: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / TEST_LABELS).write_bytes(decompressed(mirror, TEST_LABELS))
    out_dir = tmp_path / "raw"
    handler = partial(QuietFileHandler, directory=str(served))

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        path = fetch_file(TEST_LABELS, [url], out_dir, timeout_s=5)

    assert sha256_of(path.read_bytes()) == MNIST_FILES[TEST_LABELS]
    assert listing(out_dir) == [TEST_LABELS]


def test_mirror_answering_non_http_falls_back_to_the_next(mirror: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "raw"
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), NotHttpHandler)

    with serving(server) as url:
        path = fetch_file(TEST_LABELS, [url, str(mirror)], out_dir, timeout_s=2)

    assert sha256_of(path.read_bytes()) == MNIST_FILES[TEST_LABELS]
    assert listing(out_dir) == [TEST_LABELS]


def test_flipped_byte_fails_verification_and_leaves_nothing(mirror: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-mirror"
    actual = write_flipped(mirror, TRAIN_LABELS, bad)
    out_dir = tmp_path / "raw"

    with pytest.raises(FetchError) as caught:
        fetch_file(TRAIN_LABELS, [str(bad)], out_dir, timeout_s=5)

    message = str(caught.value)
    assert TRAIN_LABELS in message
    assert str(bad / f"{TRAIN_LABELS}.gz") in message
    assert "SHA-256 mismatch" in message
    assert MNIST_FILES[TRAIN_LABELS] in message
    assert actual in message
    assert actual != MNIST_FILES[TRAIN_LABELS]
    assert listing(out_dir) == []


def test_truncated_gzip_is_reported_as_broken(mirror: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-mirror"
    truncated = write_truncated_gzip(mirror, TEST_LABELS, bad)
    out_dir = tmp_path / "raw"

    with pytest.raises(FetchError, match="broken gzip") as caught:
        fetch_file(TEST_LABELS, [str(bad)], out_dir, timeout_s=5)

    message = str(caught.value)
    assert f"{truncated}: broken gzip" in message
    # The uncompressed candidate was tried as well, and is missing.
    assert f"{bad / TEST_LABELS}: not found" in message
    assert listing(out_dir) == []


@pytest.mark.parametrize("first_mirror", ["corrupt", "truncated", "missing"])
def test_falls_back_to_the_next_mirror(
    mirror: Path, tmp_path: Path, first_mirror: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = tmp_path / "first-mirror"
    if first_mirror == "corrupt":
        write_flipped(mirror, TRAIN_LABELS, first)
    elif first_mirror == "truncated":
        write_truncated_gzip(mirror, TRAIN_LABELS, first)
    out_dir = tmp_path / "raw"

    with caplog.at_level("INFO", logger="pipeline.data.fetch"):
        path = fetch_file(TRAIN_LABELS, [str(first), str(mirror)], out_dir, timeout_s=5)

    assert path == out_dir / TRAIN_LABELS
    assert sha256_of(path.read_bytes()) == MNIST_FILES[TRAIN_LABELS]
    assert listing(out_dir) == [TRAIN_LABELS]
    assert f"verified from {mirror / TRAIN_LABELS}.gz" in caplog.text


def test_no_reachable_mirror_lists_every_attempt(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-mirror"
    out_dir = tmp_path / "raw"

    with pytest.raises(FetchError) as caught:
        fetch_file(TEST_LABELS, [str(missing), UNREACHABLE_URL], out_dir, timeout_s=2)

    message = str(caught.value)
    assert f"could not fetch a verified copy of {TEST_LABELS}" in message
    tried = [line.strip() for line in message.splitlines()[1:]]
    assert len(tried) == 4, message
    assert tried[0] == f"- {missing / TEST_LABELS}.gz: not found"
    assert tried[1] == f"- {missing / TEST_LABELS}: not found"
    assert tried[2].startswith(f"- {UNREACHABLE_URL}{TEST_LABELS}.gz: ")
    assert tried[3].startswith(f"- {UNREACHABLE_URL}{TEST_LABELS}: ")
    assert listing(out_dir) == []


def test_fetch_all_failure_removes_files_fetched_in_that_call(mirror: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial-mirror"
    partial.mkdir()
    # The first three files are good; the last one (t10k labels) is corrupt.
    for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES):
        (partial / f"{name}.gz").symlink_to(mirror / f"{name}.gz")
    write_flipped(mirror, TEST_LABELS, partial)
    assert list(MNIST_FILES)[-1] == TEST_LABELS
    out_dir = tmp_path / "raw"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("not ours")

    with pytest.raises(FetchError, match=TEST_LABELS):
        fetch_all([str(partial)], out_dir, timeout_s=5)

    # What this call fetched is gone; what was there before is untouched.
    assert listing(out_dir) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "not ours"


def test_fetch_all_failure_on_first_file_leaves_nothing(mirror: Path, tmp_path: Path) -> None:
    only_labels = tmp_path / "labels-only"
    only_labels.mkdir()
    (only_labels / f"{TRAIN_LABELS}.gz").symlink_to(mirror / f"{TRAIN_LABELS}.gz")
    write_flipped(mirror, TEST_LABELS, only_labels)
    out_dir = tmp_path / "raw"

    with pytest.raises(FetchError, match=TRAIN_IMAGES):
        fetch_all([str(only_labels)], out_dir, timeout_s=5)

    assert listing(out_dir) == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")]


def test_mirror_list_puts_env_mirror_first_without_duplicates() -> None:
    configured = ["https://a.example/mnist/", "/srv/mnist", "https://b.example/"]

    assert mirror_list(configured, None) == configured
    assert mirror_list(configured, "") == configured
    assert mirror_list(configured, "/local/mnist") == ["/local/mnist", *configured]
    assert mirror_list(configured, "/srv/mnist") == [
        "/srv/mnist",
        "https://a.example/mnist/",
        "https://b.example/",
    ]
    assert mirror_list(configured, "https://b.example/") == [
        "https://b.example/",
        "https://a.example/mnist/",
        "/srv/mnist",
    ]
    # The configured list itself is not modified.
    assert configured == ["https://a.example/mnist/", "/srv/mnist", "https://b.example/"]


def test_cli_fetch_fails_cleanly_naming_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt-mirror"
    corrupt.mkdir()
    # Valid gzip, wrong content: fails verification, not decompression.
    (corrupt / f"{TRAIN_IMAGES}.gz").write_bytes(gzip.compress(b"not the MNIST images"))
    missing = tmp_path / "no-such-mirror"
    raw_dir = tmp_path / "raw"
    params = with_overrides(
        raw_params(),
        {
            "paths.raw": str(raw_dir),
            "fetch.mirrors": [str(missing)],
            "fetch.timeout_s": 2,
        },
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))

    result = CliRunner(env={"MNIST_MIRROR": str(corrupt)}).invoke(
        app, ["fetch", "-p", str(params_file)]
    )

    assert result.exit_code == 1, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert TRAIN_IMAGES in error_lines[0]
    # MNIST_MIRROR is tried first, then the mirrors of the params file.
    stderr = result.stderr
    corrupt_attempt = stderr.index(f"{corrupt / TRAIN_IMAGES}.gz: SHA-256 mismatch")
    missing_attempt = stderr.index(f"{missing / TRAIN_IMAGES}.gz: not found")
    assert corrupt_attempt < missing_attempt
    assert MNIST_FILES[TRAIN_IMAGES] in stderr
    assert "Traceback" not in result.output
    assert not raw_dir.exists() or listing(raw_dir) == []


def test_object_store_mirror_through_fsspec(mirror: Path, tmp_path: Path) -> None:
    """s3://, gs://, ... go through fsspec; its in-memory store stands in for S3 here."""
    import fsspec

    store = fsspec.filesystem("memory")
    name = "t10k-labels-idx1-ubyte"
    store.pipe(f"/mnist-bucket/mnist/{name}.gz", (mirror / f"{name}.gz").read_bytes())

    path = fetch_file(
        name, ["s3-like-but-absent://bucket/", "memory://mnist-bucket/mnist"], tmp_path
    )

    assert hashlib.sha256(path.read_bytes()).hexdigest() == MNIST_FILES[name]


def test_object_store_scheme_without_backend_is_a_clear_attempt(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="nosuchfs://"):
        fetch_file("t10k-labels-idx1-ubyte", ["nosuchfs://bucket/mnist"], tmp_path)
