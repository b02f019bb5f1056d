"""Scaling checked against the cluster before any training starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.params import ParamsError
from pipeline.training.driver import train_model
from tests.conftest import local_store, small_params


def test_more_cpus_than_the_cluster_has_fails_before_training(
    data_root: Path, tmp_path: Path, local_ray: None
) -> None:
    params = small_params(
        data_root,
        **{
            "train.scaling.num_workers": 4,
            "paths.models": str(tmp_path / "models"),
            "train.storage_path": str(tmp_path / "ray"),
        },
    )
    with pytest.raises(ParamsError, match=r"train.scaling: 4 workers x 1 CPUs = 4 CPUs.*has 2"):
        train_model(params, "mlp", local_store(tmp_path))
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "ray").exists()
