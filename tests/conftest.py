"""Shared fixtures: real MNIST through the mirror, small profiles of the real params."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import fetch, prepare
from pipeline.config import Params, parse_params
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[1]

# A profile small enough for seconds-long fits on 2 cores, still real MNIST.
SMALL = {
    "prepare.train_limit": 2500,
    "prepare.val_size": 500,
    "prepare.test_limit": 1000,
    "train.mlp.epochs": 3,
    "train.cnn.epochs": 3,
}


def mirror_folder() -> Path:
    """The offline MNIST mirror: $MNIST_MIRROR, or ../shared/mnist beside the checkout."""
    folder = Path(os.environ.get("MNIST_MIRROR") or REPO.parent / "shared" / "mnist")
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST mirror not found at {folder}: set MNIST_MIRROR")
    return folder


def raw_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted keys (`train.cnn.lr`) set."""
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return result


def small_params(root: Path, **overrides: Any) -> Params:
    """Repo params on the SMALL profile, with every path under `root`."""
    paths = {f"paths.{k}": str(root / k) for k in ("raw", "prepared", "models", "metrics", "plots")}
    paths["train.storage_path"] = str(root / "ray")
    raw = with_overrides(raw_params(), SMALL | paths | overrides)
    return parse_params(raw, "test params")


@pytest.fixture(scope="session")
def mirror() -> Path:
    return mirror_folder()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """Raw files fetched through the real fetch stage, and the SMALL profile prepared."""
    root = tmp_path_factory.mktemp("data")
    params = small_params(root)
    fetch.run(params, Settings(mnist_mirror=str(mirror)))
    prepare.run(params)
    return root


@pytest.fixture
def params(data_root: Path, tmp_path: Path) -> Params:
    """SMALL-profile params reading the shared prepared data, writing under `tmp_path`."""
    outputs = {f"paths.{k}": str(tmp_path / k) for k in ("models", "metrics", "plots")}
    return small_params(
        data_root,
        **outputs,
        **{"train.storage_path": str(tmp_path / "ray")},
    )
