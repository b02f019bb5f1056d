"""Prepare stage: validated IDX -> seeded train/val split, test kept apart, uint8 arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config.params import Params, PrepareConfig
from pipeline.data.atomic import atomic_path, write_json
from pipeline.data.idx import IdxError, read_images, read_labels
from pipeline.data.prepared import CLASSES, Normalization, Split, SplitArrays, save_prepared

DATA_REPORT = "data.json"


def load_raw(raw_dir: Path, prefix: str) -> SplitArrays:
    images = read_images(raw_dir / f"{prefix}-images-idx3-ubyte")
    labels = read_labels(raw_dir / f"{prefix}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise IdxError(f"{raw_dir}/{prefix}: {len(images)} images but {len(labels)} labels")
    return SplitArrays(images, labels)


def _take(arrays: SplitArrays, index: np.ndarray) -> SplitArrays:
    return SplitArrays(arrays.images[index], arrays.labels[index])


def split_data(
    train: SplitArrays, test: SplitArrays, config: PrepareConfig, seed: int
) -> dict[Split, SplitArrays]:
    """Shuffle with `seed`, cut `val_size` off the training set, apply optional limits."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))[: config.train_limit or len(train)]
    val_index, train_index = order[: config.val_size], order[config.val_size :]
    test_index = np.arange(len(test))
    if config.test_limit:
        test_index = np.sort(rng.permutation(len(test))[: config.test_limit])
    return {
        "train": _take(train, np.sort(train_index)),
        "val": _take(train, np.sort(val_index)),
        "test": _take(test, test_index),
    }


def normalization_of(train: SplitArrays) -> Normalization:
    pixels = train.images.astype(np.float64) / 255.0
    return Normalization(mean=round(float(pixels.mean()), 6), std=round(float(pixels.std()), 6))


def class_report(splits: dict[Split, SplitArrays]) -> dict[str, dict[str, int]]:
    report: dict[str, dict[str, int]] = {}
    for split, arrays in splits.items():
        counts = np.bincount(arrays.labels, minlength=len(CLASSES)).tolist()
        report[split] = {"total": len(arrays)} | dict(zip(CLASSES, counts, strict=True))
    return report


def run(params: Params) -> dict[str, dict[str, int]]:
    """The stage: raw IDX files -> `paths.prepared` and the data report; returns the report."""
    raw = Path(params.paths.raw)
    splits = split_data(load_raw(raw, "train"), load_raw(raw, "t10k"), params.prepare, params.seed)
    with atomic_path(Path(params.paths.prepared)) as staged:
        save_prepared(staged, splits, normalization_of(splits["train"]), params.seed)
    report = class_report(splits)
    write_json(Path(params.paths.metrics) / DATA_REPORT, report)
    return report
