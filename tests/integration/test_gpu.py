"""GPU nodes: one GPU per worker, NCCL, bf16. Runs only where CUDA is available."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.training.driver import train_model
from tests.conftest import small_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def gpu_ray() -> Iterator[None]:
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_auto_uses_one_gpu_per_worker_with_nccl_and_bf16(
    data_root: Path, tmp_path: Path, gpu_ray: None, name: str
) -> None:
    workers = torch.cuda.device_count()
    params: Params = small_params(
        data_root,
        **{
            "train.scaling.num_workers": workers,
            "train.scaling.use_gpu": "auto",
            f"train.{name}.batch_size": 128 * workers,
            "paths.models": str(tmp_path / "models"),
            "paths.plots": str(tmp_path / "plots"),
            "train.storage_path": str(tmp_path / "ray"),
        },
    )
    outcome = train_model(params, name, Settings(), run_name=f"gpu-{name}")  # type: ignore[arg-type]
    assert outcome.runtime["backend"] == "nccl"
    assert outcome.runtime["precision"] == "bf16-mixed"
    assert outcome.runtime["device"].startswith("cuda")
    assert outcome.runtime["world_size"] == workers
    assert outcome.spec.val_accuracy > 0.85
    train_size = params.prepare.train_limit - params.prepare.val_size  # type: ignore[operator]
    assert all(row["train/samples"] == train_size for row in outcome.history)
