"""The prepare stage: strict IDX parsing, seeded splits of real MNIST, atomic output."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.params import PrepareConfig
from pipeline.data import prepare
from pipeline.data.atomic import atomic_path
from pipeline.data.idx import IdxError, parse_idx, read_images, read_labels
from pipeline.data.prepare import load_raw, normalization_of, split_data
from pipeline.data.prepared import (
    CLASSES,
    MANIFEST,
    SPLITS,
    Split,
    SplitArrays,
    content_digest,
    open_prepared,
)
from tests.conftest import SMALL, small_params

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# MNIST holds a few exact duplicate images; different indices may still share pixels.
MAX_DUPLICATE_ROWS = 5


def idx_bytes(shape: tuple[int, ...], payload: bytes, dtype: int = 0x08) -> bytes:
    """A hand-built IDX file: magic (0, dtype, ndim), big-endian dims, payload."""
    return (
        struct.pack(">HBB", 0, dtype, len(shape)) + struct.pack(f">{len(shape)}I", *shape) + payload
    )


def row_hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest() for image in images}


# --- IDX parsing -----------------------------------------------------------------------


def test_parse_idx_accepts_a_valid_tiny_file() -> None:
    data = idx_bytes((2, 3), bytes([0, 1, 2, 253, 254, 255]))

    array = parse_idx(data, 2, "tiny.idx")

    assert array.dtype == np.uint8
    assert array.shape == (2, 3)
    assert array.tolist() == [[0, 1, 2], [253, 254, 255]]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x01\x08\x01" + struct.pack(">I", 3) + b"abc", id="nonzero-lead"),
        pytest.param(idx_bytes((3,), b"abc", dtype=0x0D), id="float-dtype"),
        pytest.param(idx_bytes((1, 3), b"abc"), id="wrong-ndim"),
        pytest.param(gzip.compress(idx_bytes((3,), b"abc")), id="still-gzipped"),
    ],
)
def test_parse_idx_rejects_bad_magic(data: bytes) -> None:
    with pytest.raises(IdxError, match=r"^labels\.idx: bad magic number 0x"):
        parse_idx(data, 1, "labels.idx")


def test_parse_idx_rejects_too_short_input() -> None:
    with pytest.raises(IdxError, match=r"^empty\.idx: too short"):
        parse_idx(b"\x00\x00", 1, "empty.idx")


def test_parse_idx_rejects_truncated_header() -> None:
    data = idx_bytes((4, 28, 28), b"")[:10]

    with pytest.raises(IdxError, match=r"^images\.idx: truncated header"):
        parse_idx(data, 3, "images.idx")


def test_parse_idx_rejects_truncated_payload() -> None:
    data = idx_bytes((2, 3), bytes(6))[:-1]

    with pytest.raises(
        IdxError, match=r"^cut\.idx: truncated: 17 bytes, expected 18 for shape \(2, 3\)$"
    ):
        parse_idx(data, 2, "cut.idx")


def test_parse_idx_rejects_trailing_bytes() -> None:
    data = idx_bytes((2, 3), bytes(6)) + b"\x00"

    with pytest.raises(IdxError, match=r"^long\.idx: has trailing bytes: 19 bytes, expected 18"):
        parse_idx(data, 2, "long.idx")


def test_parse_idx_rejects_an_empty_dimension() -> None:
    with pytest.raises(IdxError, match="empty dimension"):
        parse_idx(idx_bytes((0,), b""), 1, "none.idx")


def test_parse_idx_rejects_a_header_whose_size_overflows() -> None:
    data = idx_bytes((2**31, 2**31, 4), b"")

    with pytest.raises(IdxError, match="truncated"):
        parse_idx(data, 3, "huge.idx")


def test_read_labels_rejects_labels_above_nine(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes((4,), bytes([0, 9, 10, 3])))

    with pytest.raises(IdxError, match="label 10 is not a digit") as caught:
        read_labels(path)
    assert str(path) in str(caught.value)


def test_read_labels_accepts_all_digits(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(idx_bytes((10,), bytes(range(10))))

    assert read_labels(path).tolist() == list(range(10))


def test_read_images_rejects_images_that_are_not_28x28(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(idx_bytes((2, 4, 4), bytes(32)))

    with pytest.raises(IdxError, match=r"expected 28x28") as caught:
        read_images(path)
    assert str(path) in str(caught.value)


def test_read_images_rejects_a_truncated_real_file(mirror: Path, tmp_path: Path) -> None:
    data = gzip.decompress((mirror / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert len(data) == 16 + 10_000 * 28 * 28
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(data[: len(data) - 28 * 28 // 2])  # half of the last image missing

    with pytest.raises(IdxError) as caught:
        read_images(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: truncated")
    assert "(10000, 28, 28)" in message


# --- The prepared SMALL profile ----------------------------------------------------------

EXPECTED_SIZES = {
    "train": SMALL["prepare.train_limit"] - SMALL["prepare.val_size"],
    "val": SMALL["prepare.val_size"],
    "test": SMALL["prepare.test_limit"],
}


@pytest.fixture(scope="module")
def raw_sets(data_root: Path) -> dict[str, SplitArrays]:
    """The original MNIST sets, as fetched into the fixture's raw folder."""
    raw = data_root / "raw"
    return {"train": load_raw(raw, "train"), "t10k": load_raw(raw, "t10k")}


@pytest.fixture(scope="module")
def prepared(data_root: Path) -> dict[Split, SplitArrays]:
    data = open_prepared(data_root / "prepared")
    return {split: data.load(split) for split in SPLITS}


def test_prepared_split_sizes_match_params(
    data_root: Path, prepared: dict[Split, SplitArrays]
) -> None:
    assert EXPECTED_SIZES == {"train": 2000, "val": 500, "test": 1000}
    assert {split: len(arrays) for split, arrays in prepared.items()} == EXPECTED_SIZES
    assert open_prepared(data_root / "prepared").sizes == EXPECTED_SIZES


def test_prepared_arrays_are_uint8_images_and_digit_labels(
    prepared: dict[Split, SplitArrays],
) -> None:
    for split, arrays in prepared.items():
        assert arrays.images.dtype == np.uint8, split
        assert arrays.labels.dtype == np.uint8, split
        assert arrays.images.shape == (EXPECTED_SIZES[split], 28, 28), split
        assert arrays.labels.max() <= 9, split
        # Real digits: dark background, some full-ink pixels.
        assert arrays.images.min() == 0, split
        assert arrays.images.max() == 255, split


def test_class_report_adds_up_and_matches_the_labels(
    data_root: Path, prepared: dict[Split, SplitArrays]
) -> None:
    report = json.loads((data_root / "metrics" / prepare.DATA_REPORT).read_text())

    assert set(report) == set(SPLITS)
    for split, counts in report.items():
        assert set(counts) == {"total", *CLASSES}, split
        assert counts["total"] == EXPECTED_SIZES[split], split
        assert sum(counts[digit] for digit in CLASSES) == counts["total"], split
        assert all(counts[digit] > 0 for digit in CLASSES), split
        per_class = np.bincount(prepared[split].labels, minlength=10).tolist()
        assert [counts[digit] for digit in CLASSES] == per_class, split


def test_train_and_val_do_not_overlap(prepared: dict[Split, SplitArrays]) -> None:
    train_rows = row_hashes(prepared["train"].images)
    val_rows = row_hashes(prepared["val"].images)

    # Nearly every image is distinct within a split: the rows hashes are meaningful.
    assert len(train_rows) >= EXPECTED_SIZES["train"] - MAX_DUPLICATE_ROWS
    assert len(val_rows) >= EXPECTED_SIZES["val"] - MAX_DUPLICATE_ROWS
    assert len(train_rows & val_rows) <= MAX_DUPLICATE_ROWS


def test_splits_come_from_the_right_original_set(
    prepared: dict[Split, SplitArrays], raw_sets: dict[str, SplitArrays]
) -> None:
    original_train = row_hashes(raw_sets["train"].images)
    original_test = row_hashes(raw_sets["t10k"].images)

    assert row_hashes(prepared["train"].images) <= original_train
    assert row_hashes(prepared["val"].images) <= original_train
    assert row_hashes(prepared["test"].images) <= original_test
    # The test split is held out: (almost) none of it appears among the training images.
    assert len(row_hashes(prepared["test"].images) & original_train) <= MAX_DUPLICATE_ROWS


def test_manifest_normalization_is_mnist_like_and_from_train(
    data_root: Path, prepared: dict[Split, SplitArrays]
) -> None:
    manifest = json.loads((data_root / "prepared" / MANIFEST).read_text())
    normalization = open_prepared(data_root / "prepared").normalization

    assert manifest["normalization"] == {"mean": normalization.mean, "std": normalization.std}
    assert normalization.mean == pytest.approx(MNIST_MEAN, abs=0.01)
    assert normalization.std == pytest.approx(MNIST_STD, abs=0.01)
    assert normalization == normalization_of(prepared["train"])


def test_manifest_digest_names_the_prepared_content(
    data_root: Path, prepared: dict[Split, SplitArrays]
) -> None:
    manifest = json.loads((data_root / "prepared" / MANIFEST).read_text())

    assert manifest["digest"] == content_digest(prepared)
    assert manifest["seed"] == small_params(data_root).seed


# --- Seeded splitting ---------------------------------------------------------------------


def small_config() -> PrepareConfig:
    return PrepareConfig(
        train_limit=SMALL["prepare.train_limit"],
        val_size=SMALL["prepare.val_size"],
        test_limit=SMALL["prepare.test_limit"],
    )


def assert_same_splits(a: dict[Split, SplitArrays], b: dict[Split, SplitArrays]) -> None:
    for split in SPLITS:
        np.testing.assert_array_equal(a[split].images, b[split].images, err_msg=split)
        np.testing.assert_array_equal(a[split].labels, b[split].labels, err_msg=split)


def test_split_is_deterministic_for_a_seed(
    raw_sets: dict[str, SplitArrays], data_root: Path
) -> None:
    seed = small_params(data_root).seed
    first = split_data(raw_sets["train"], raw_sets["t10k"], small_config(), seed)
    second = split_data(raw_sets["train"], raw_sets["t10k"], small_config(), seed)

    assert_same_splits(first, second)
    # The prepare stage produced exactly this split.
    assert content_digest(first) == open_prepared(data_root / "prepared").digest


def test_split_differs_for_another_seed(raw_sets: dict[str, SplitArrays]) -> None:
    one = split_data(raw_sets["train"], raw_sets["t10k"], small_config(), 1)
    other = split_data(raw_sets["train"], raw_sets["t10k"], small_config(), 2)

    assert {split: len(arrays) for split, arrays in other.items()} == EXPECTED_SIZES
    for split in SPLITS:
        assert not np.array_equal(one[split].images, other[split].images), split
    assert content_digest(one) != content_digest(other)


def test_full_split_keeps_every_image(raw_sets: dict[str, SplitArrays]) -> None:
    splits = split_data(raw_sets["train"], raw_sets["t10k"], PrepareConfig(val_size=5000), 0)

    assert {split: len(arrays) for split, arrays in splits.items()} == {
        "train": 55_000,
        "val": 5_000,
        "test": 10_000,
    }
    labels = np.concatenate([splits["train"].labels, splits["val"].labels])
    assert np.bincount(labels).tolist() == np.bincount(raw_sets["train"].labels).tolist()
    np.testing.assert_array_equal(splits["test"].images, raw_sets["t10k"].images)


# --- Atomic output ------------------------------------------------------------------------


def raw_folder_with(data_root: Path, folder: Path, truncate: str | None = None) -> Path:
    """Links to the fixture's raw files, with `truncate` replaced by a cut copy."""
    folder.mkdir()
    for name in RAW_FILES:
        source = data_root / "raw" / name
        if name == truncate:
            data = source.read_bytes()
            (folder / name).write_bytes(data[: len(data) - 100])
        else:
            (folder / name).symlink_to(source)
    return folder


def dummy_prepared(folder: Path) -> Path:
    folder.mkdir()
    marker = folder / "marker.txt"
    marker.write_text("prepared earlier")
    return marker


def test_prepare_failure_leaves_the_previous_output_untouched(
    data_root: Path, tmp_path: Path
) -> None:
    truncated = "t10k-labels-idx1-ubyte"  # read last: everything else parsed first
    raw = raw_folder_with(data_root, tmp_path / "raw", truncate=truncated)
    marker = dummy_prepared(tmp_path / "prepared")
    params = small_params(tmp_path)

    with pytest.raises(IdxError, match="truncated") as caught:
        prepare.run(params)

    assert str(raw / truncated) in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["marker.txt"]
    assert marker.read_text() == "prepared earlier"
    # No staging folder beside it, and no data report for data that was never prepared.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw"]


def test_prepare_replaces_the_previous_output(data_root: Path, tmp_path: Path) -> None:
    raw_folder_with(data_root, tmp_path / "raw")
    dummy_prepared(tmp_path / "prepared")
    params = small_params(tmp_path)

    report = prepare.run(params)

    prepared_dir = tmp_path / "prepared"
    assert not (prepared_dir / "marker.txt").exists()
    assert open_prepared(prepared_dir).digest == open_prepared(data_root / "prepared").digest
    assert {split: counts["total"] for split, counts in report.items()} == EXPECTED_SIZES
    assert json.loads((tmp_path / "metrics" / prepare.DATA_REPORT).read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics", "prepared", "raw"]
    assert not [p.name for p in (tmp_path / "metrics").iterdir() if p.name.startswith(".")]


def test_atomic_path_keeps_the_old_folder_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "prepared"
    marker = dummy_prepared(target)

    def interrupted_write() -> None:
        with atomic_path(target) as staged:
            staged.mkdir()
            (staged / "half-written.npy").write_bytes(b"\x93NUMPY")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted_write()

    assert sorted(p.name for p in target.iterdir()) == ["marker.txt"]
    assert marker.read_text() == "prepared earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
