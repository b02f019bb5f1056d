"""Train stage: Lightning on Ray Train workers; the best checkpoint becomes `models/<name>/`.

The Ray glue lives here alone: `worker_loop` runs on every worker, `train_model` is the
driver that sizes and starts them. Nothing else in the package knows it runs on Ray.
"""

from __future__ import annotations

import csv
import io
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import numpy as np
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.lightning import (
    RayDDPStrategy,
    RayLightningEnvironment,
    RayTrainReportCallback,
    prepare_trainer,
)
from ray.train.torch import TorchConfig, TorchTrainer
from torch.utils.data import DataLoader, TensorDataset

from pipeline.artifact import ModelSpec, save_model, state_dict_from_lightning
from pipeline.cluster import check_storage
from pipeline.config import ModelName, Params, ParamsError, parse_params
from pipeline.data import Normalization, PreparedData, SplitArrays, open_prepared
from pipeline.io import write_text
from pipeline.models.module import Classifier
from pipeline.models.networks import build_network
from pipeline.settings import Settings
from pipeline.tracking import (
    MlflowEpochLogger,
    ensure_reachable,
    log_model,
    log_training_curves,
    tracking_uri,
    training_run,
)

log = logging.getLogger(__name__)

MONITOR = "val/accuracy"
HISTORY_COLUMNS = ("epoch", "train/loss", "val/loss", "val/accuracy")
EVAL_BATCH = 1000


class EpochHistory(pl.Callback):
    """Per-epoch metrics, per-rank sample counts and the runtime; history survives resumes.

    Must precede `RayTrainReportCallback`: the counts it logs are part of each report.
    """

    def __init__(self, total_epochs: int) -> None:
        self.total_epochs = total_epochs
        self.rows: list[dict[str, float]] = []
        self.runtime: dict[str, Any] = {}
        self._samples = 0
        self._started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        distributed = torch.distributed.is_initialized()
        self.runtime = {
            "backend": torch.distributed.get_backend() if distributed else "none",
            "precision": str(trainer.precision),
            "device": str(pl_module.device),
            "world_size": trainer.world_size,
            "torch_threads": torch.get_num_threads(),
        }

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = 0
        self._started = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._samples += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = pl_module.all_gather(torch.tensor(self._samples, device=pl_module.device))
        assert isinstance(counts, torch.Tensor)
        per_rank = [float(c) for c in counts.reshape(-1).tolist()]
        # Already global after all_gather; "max" only tells Lightning so.
        for rank, count in enumerate(per_rank):
            pl_module.log(f"train/samples_rank{rank}", count, sync_dist=True, reduce_fx="max")
        pl_module.log("train/samples", sum(per_rank), sync_dist=True, reduce_fx="max")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": float(trainer.current_epoch)} | metrics
        self.rows.append(row)
        if trainer.is_global_zero:
            log.info(
                "epoch %d/%d  train/loss %.4f  val/loss %.4f  val/accuracy %.4f  (%.1f s)",
                trainer.current_epoch + 1,
                self.total_epochs,
                row.get("train/loss", float("nan")),
                row.get("val/loss", float("nan")),
                row.get("val/accuracy", float("nan")),
                time.perf_counter() - self._started,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


@dataclass(frozen=True)
class WorkerData:
    """What workers train on: the splits in Ray's object store, reachable from every node."""

    train: ray.ObjectRef[SplitArrays]
    val: ray.ObjectRef[SplitArrays]
    normalization: Normalization

    @classmethod
    def put(cls, data: PreparedData) -> WorkerData:
        return cls(ray.put(data.load("train")), ray.put(data.load("val")), data.normalization)


def _dataset(arrays: SplitArrays) -> TensorDataset:
    return TensorDataset(torch.from_numpy(arrays.images), torch.from_numpy(arrays.labels).long())


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on each Ray worker: validate params again, train this worker's shard with DDP.

    Returns (rank 0's reaches the driver) the epoch history and the runtime actually used.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    params = parse_params(config["params"], "params (on a Ray worker)")
    name: ModelName = config["model"]
    use_gpu: bool = config["use_gpu"]
    scaling = params.train.scaling
    model_config = params.train.model(name)
    torch.set_num_threads(scaling.cpus_per_worker)
    pl.seed_everything(params.seed, workers=True, verbose=False)

    # From the object store, not a path: a worker on another node cannot see the driver's disk.
    data: WorkerData = config["data"]
    net = build_network(name, model_config.net, data.normalization.mean, data.normalization.std)
    module = Classifier(net, model_config)
    # Lightning swaps in a DistributedSampler: each worker sees 1/num_workers of the split.
    per_worker_batch = model_config.batch_size // scaling.num_workers
    train_loader = DataLoader(
        _dataset(ray.get(data.train)), batch_size=per_worker_batch, shuffle=True
    )
    val_loader = DataLoader(_dataset(ray.get(data.val)), batch_size=EVAL_BATCH)

    history = EpochHistory(model_config.epochs)
    tracking = MlflowEpochLogger(config["tracking"]["uri"], config["tracking"]["run_id"])
    trainer = pl.Trainer(
        max_epochs=model_config.epochs,
        accelerator="gpu" if use_gpu else "cpu",
        devices="auto",
        precision="bf16-mixed" if use_gpu else "32-true",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[history, tracking, RayTrainReportCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    trainer = prepare_trainer(trainer)
    resume = ray.train.get_checkpoint()
    if resume is None:
        trainer.fit(module, train_loader, val_loader)
    else:
        with resume.as_directory() as folder:
            log.info("resuming from %s", resume.path)
            ckpt = Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt))
    return {"history": history.rows, "runtime": history.runtime}


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join the cluster at `address`, or start a local Ray sized to this machine for the block."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def resolve_scaling(params: Params) -> tuple[ScalingConfig, bool]:
    """Ray's ScalingConfig from params, checked against what the cluster has."""
    scaling = params.train.scaling
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    use_gpu = gpus >= 1 if scaling.use_gpu == "auto" else scaling.use_gpu
    if use_gpu and gpus < scaling.num_workers:
        raise ParamsError(
            f"train.scaling.use_gpu: {scaling.num_workers} workers need one GPU each, "
            f"the Ray cluster has {gpus:g}"
        )
    needed = scaling.num_workers * scaling.cpus_per_worker
    if needed > cpus:
        raise ParamsError(
            f"train.scaling: {scaling.num_workers} workers x {scaling.cpus_per_worker} CPUs "
            f"= {needed} CPUs, the Ray cluster has {cpus:g}"
        )
    per_worker = {"CPU": float(scaling.cpus_per_worker)} | ({"GPU": 1.0} if use_gpu else {})
    config = ScalingConfig(
        num_workers=scaling.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
    )
    return config, use_gpu


@dataclass(frozen=True)
class TrainOutcome:
    model_file: Path
    spec: ModelSpec
    history: list[dict[str, float]]
    runtime: dict[str, Any]
    run_path: str


def history_csv(history: list[dict[str, float]]) -> str:
    """The curves DVC plots: one row per epoch."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow(
            {k: int(row[k]) if k == "epoch" else f"{row[k]:.6f}" for k in HISTORY_COLUMNS}
        )
    return buffer.getvalue()


def _fit(
    params: Params,
    name: ModelName,
    scaling: ScalingConfig,
    use_gpu: bool,
    run_name: str,
    storage: str,
    tracking: dict[str, str],
) -> Result:
    trainer = TorchTrainer(
        worker_loop,  # type: ignore[arg-type]  # Ray hands rank 0's return value back
        train_loop_config={
            "params": params.model_dump(mode="json"),
            "model": name,
            "use_gpu": use_gpu,
            "data": WorkerData.put(open_prepared(Path(params.paths.prepared))),
            "tracking": tracking,
        },
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=MONITOR, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=params.train.max_failures),
        ),
    )
    return trainer.fit()


def _best_network(result: Result) -> tuple[dict[str, torch.Tensor], int]:
    best = result.get_best_checkpoint(MONITOR, "max")
    if best is None:
        raise RuntimeError(f"training reported no checkpoint (run at {result.path})")
    with best.as_directory() as folder:
        return state_dict_from_lightning(Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME)


def train_model(
    params: Params, name: ModelName, settings: Settings, run_name: str | None = None
) -> TrainOutcome:
    """Train `name` on Ray workers inside one MLflow run; export and log its best checkpoint.

    Nothing is written to `models/` unless training and logging both succeed.
    """
    paths = params.paths
    data = open_prepared(Path(paths.prepared))
    uri = tracking_uri(settings)
    ensure_reachable(uri)
    run_name = run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with ray_session(settings.ray_address):
        scaling, use_gpu = resolve_scaling(params)
        storage = check_storage(params.train.storage_path)
        log.info(
            "training %s on %d Ray worker(s), %d CPU(s)%s each",
            name,
            scaling.num_workers,
            params.train.scaling.cpus_per_worker,
            " + 1 GPU" if use_gpu else "",
        )
        with training_run(params, name, uri, Path(paths.prepared), data.digest) as run_id:
            mlflow.log_params(
                {
                    "ray.num_workers": scaling.num_workers,
                    "ray.cpus_per_worker": params.train.scaling.cpus_per_worker,
                    "ray.gpus_per_worker": 1 if use_gpu else 0,
                    "ray.cluster": "external" if settings.ray_address else "local",
                    "ray.run_name": run_name,
                }
            )
            result = _fit(
                params, name, scaling, use_gpu, run_name, storage, {"uri": uri, "run_id": run_id}
            )
            returned: dict[str, Any] = result.return_value  # type: ignore[attr-defined]
            log.info("workers ran with %s", returned["runtime"])
            mlflow.set_tags({f"runtime.{k}": str(v) for k, v in returned["runtime"].items()})
            history: list[dict[str, float]] = returned["history"]
            state, epoch = _best_network(result)
            best_row = next(row for row in history if int(row["epoch"]) == epoch)
            spec = ModelSpec.describe(
                name,
                params.train.model(name).net,
                data.normalization,
                data.digest,
                epoch=epoch,
                val_accuracy=best_row[MONITOR],
                run_id=run_id,
            )
            net = spec.build().eval()
            net.load_state_dict(state)
            mlflow.log_metrics({"best/val_accuracy": spec.val_accuracy, "best/epoch": epoch})
            example = data.load("val").images[:2].astype(np.float32) / 255.0
            log_training_curves(history, name)
            model_uri = log_model(net, example, spec.model_dump(mode="json"))
            mlflow.set_tag("model_uri", model_uri)
            model_file = save_model(Path(paths.models) / name, net, spec)
            write_text(Path(paths.plots) / name / "history.csv", history_csv(history))
    return TrainOutcome(model_file, spec, history, returned["runtime"], result.path)
