"""The one TorchTrainer builder: what `train` and every Tune trial run on Ray Train."""

from __future__ import annotations

from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.config.base import ModelName
from pipeline.config.params import Params
from pipeline.training.worker import WorkerData, worker_loop


def build_trainer(
    params: Params,
    name: ModelName,
    use_gpu: bool,
    data: ray.ObjectRef[WorkerData],
    run_name: str,
    storage: str,
    checkpoints: CheckpointConfig,
    callbacks: list[Any],
) -> TorchTrainer:
    """`worker_loop` on `train.scaling` workers, resuming a run of the same name; `callbacks`
    are Ray Train's only: Tune's own go in Tune's RunConfig."""
    scaling = params.train.scaling
    per_worker = {"CPU": float(scaling.cpus_per_worker)} | ({"GPU": 1.0} if use_gpu else {})
    return TorchTrainer(
        worker_loop,  # type: ignore[arg-type]  # Ray hands rank 0's return value back
        train_loop_config=dict(
            params=params.model_dump(mode="json"), model=name, use_gpu=use_gpu, data=data
        ),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=checkpoints,
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            # Type checkers see ray.train's V1 RunConfig; at run time it is V2's.
            callbacks=callbacks,
        ),
    )
