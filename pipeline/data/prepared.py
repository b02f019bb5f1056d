"""The prepared data set: compact uint8 arrays per split, plus a manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SplitArrays:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # uint8 (N,)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Normalization:
    mean: float
    std: float


def _files(split: Split) -> tuple[str, str]:
    return f"{split}_images.npy", f"{split}_labels.npy"


def content_digest(splits: dict[Split, SplitArrays]) -> str:
    """SHA-256 over every split's arrays: names the exact data a model saw."""
    digest = hashlib.sha256()
    for split in SPLITS:
        arrays = splits[split]
        for array in (arrays.images, arrays.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_prepared(
    folder: Path, splits: dict[Split, SplitArrays], normalization: Normalization, seed: int
) -> None:
    folder.mkdir(parents=True)
    for split in SPLITS:
        arrays = splits[split]
        for file, array in zip(_files(split), (arrays.images, arrays.labels), strict=True):
            np.save(folder / file, array, allow_pickle=False)
    manifest = {
        "digest": content_digest(splits),
        "sizes": {split: len(splits[split]) for split in SPLITS},
        "normalization": {"mean": normalization.mean, "std": normalization.std},
        "seed": seed,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class PreparedData:
    folder: Path
    digest: str
    normalization: Normalization
    sizes: dict[str, int]

    def load(self, split: Split) -> SplitArrays:
        images, labels = (np.load(self.folder / f, allow_pickle=False) for f in _files(split))
        return SplitArrays(images, labels)


def open_prepared(folder: Path) -> PreparedData:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: run `mnist-pipeline prepare` (or `dvc repro prepare`)"
        )
    manifest = json.loads(manifest_path.read_text())
    normalization = Normalization(**manifest["normalization"])
    return PreparedData(folder, manifest["digest"], normalization, manifest["sizes"])
