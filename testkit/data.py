"""MNIST from the offline mirror and the repo's params with every path under a folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.env import Settings
from pipeline.config.params import Params, parse_params, with_overrides
from pipeline.data import fetch, prepare

REPO = Path(__file__).resolve().parents[1]
OUTPUT_PATHS = ("models", "metrics", "plots", "reports")
ALL_PATHS = ("raw", "prepared", *OUTPUT_PATHS)


def mirror_folder() -> Path:
    """The offline MNIST mirror: $MNIST_MIRROR, or ../shared/mnist beside the checkout."""
    folder = Path(os.environ.get("MNIST_MIRROR") or REPO.parent / "shared" / "mnist")
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"MNIST mirror not found at {folder}: set MNIST_MIRROR")
    return folder


def raw_params() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text())
    return raw


def params_under(root: Path, overrides: dict[str, Any], label: str = "scratch params") -> Params:
    """The repo's params with every output path under `root`, then dotted `overrides`."""
    paths: dict[str, Any] = {f"paths.{k}": str(root / k) for k in ALL_PATHS}
    paths["train.storage_path"] = str(root / "ray")
    return parse_params(with_overrides(raw_params(), paths | overrides), label)


def fetch_and_prepare(params: Params) -> None:
    """The pipeline's own fetch and prepare stages, reading the mirror."""
    fetch.run(params, Settings(mnist_mirror=str(mirror_folder())))
    prepare.run(params)
