"""Train stage: Lightning on Ray Train workers; the best checkpoint becomes `models/<name>/`.

The Ray glue lives here alone: `worker_loop` runs on every worker, `train_model` is the
driver that sizes and starts them. Nothing else in the package knows it runs on Ray.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import pickle
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import numpy as np
import ray
import ray.train
import torch
from mlflow.tracking import MlflowClient
from ray.exceptions import RayActorError
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    WorkerGroupError,
)
from ray.train.lightning import (
    RayDDPStrategy,
    RayLightningEnvironment,
    RayTrainReportCallback,
    prepare_trainer,
)
from ray.train.torch import TorchConfig, TorchTrainer
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.artifact import ModelSpec, save_model, state_dict_from_lightning
from pipeline.cluster import check_storage
from pipeline.config import ModelName, Params, ParamsError, parse_params
from pipeline.data import Normalization, PreparedData, SplitArrays, open_prepared
from pipeline.io import write_text
from pipeline.models.module import Classifier
from pipeline.models.networks import build_network
from pipeline.recorder import RunRecorder
from pipeline.settings import Settings
from pipeline.tracking import (
    FAILURE_TAG,
    ensure_reachable,
    log_model,
    log_new_epochs,
    log_training_curves,
    logged_epochs,
    tracking_uri,
    training_run,
)

log = logging.getLogger(__name__)

MONITOR = "val/accuracy"
HISTORY_COLUMNS = ("epoch", "train/loss", "val/loss", "val/accuracy")
EVAL_BATCH = 1000
# Also a folder name under train.storage_path and an MLflow search value: no quoting needed.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CheckpointError(RuntimeError):
    """A checkpoint to resume from cannot be read; the message names it."""


class TrainingError(RuntimeError):
    """Training failed beyond `train.max_failures`; the message names rank, epoch and cause."""


class EpochHistory(pl.Callback):
    """Per-epoch metrics, per-rank sample counts, timings and the runtime; history survives
    resumes.

    Must precede `RayTrainReportCallback`: the counts it logs are part of each report.
    """

    def __init__(self, total_epochs: int) -> None:
        self.total_epochs = total_epochs
        self.rows: list[dict[str, float]] = []
        self.runtime: dict[str, Any] = {}
        # Per epoch: its wall-clock start and its training + validation seconds. The time from
        # one start to the next adds what happens between epochs (checkpoint, report to Ray).
        self.timings: list[dict[str, float]] = []
        self._samples = 0
        self._started = 0.0
        self._wall_started = 0.0

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
        self._wall_started = time.time()

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
        elapsed = time.perf_counter() - self._started
        self.timings.append(
            {"epoch": row["epoch"], "started": self._wall_started, "train_val_s": elapsed}
        )
        if trainer.is_global_zero:
            log.info(
                "epoch %d/%d  train/loss %.4f  val/loss %.4f  val/accuracy %.4f  (%.1f s)",
                trainer.current_epoch + 1,
                self.total_epochs,
                row.get("train/loss", float("nan")),
                row.get("val/loss", float("nan")),
                row.get("val/accuracy", float("nan")),
                elapsed,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "timings": self.timings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])
        self.timings = list(state_dict.get("timings", []))


class RngState(pl.Callback):
    """Checkpoints torch's generators (the only ones training draws from: dropout,
    augmentation, loader seeds), so that an epoch after a resume draws what it would have
    drawn without the interruption. Every rank has the same state (same seed, same draws),
    so rank 0's, the one saved, fits all."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def verified_checkpoint(folder: Path) -> tuple[Path, int]:
    """The Lightning file of a Ray checkpoint folder and the epoch it ended, once it loads.

    Ray only commits a checkpoint after its files are fully copied, so a damaged one means
    damaged storage: stop with its path rather than fail somewhere inside Lightning.
    """
    path = folder / RayTrainReportCallback.CHECKPOINT_NAME
    try:
        _, epoch = state_dict_from_lightning(path)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {error}") from None
    return path, epoch


@dataclass(frozen=True)
class WorkerData:
    """What workers train on: the splits in Ray's object store, reachable from every node."""

    train: ray.ObjectRef[SplitArrays]
    val: ray.ObjectRef[SplitArrays]
    normalization: Normalization

    @classmethod
    def put(cls, data: PreparedData) -> WorkerData:
        return cls(ray.put(data.load("train")), ray.put(data.load("val")), data.normalization)


class SplitRows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A split as two tensors; an item is a whole batch: (images, labels) at a tensor of
    indices, taken with one `index_select` each (faster than advanced indexing)."""

    def __init__(self, arrays: SplitArrays) -> None:
        self.images = torch.from_numpy(arrays.images)
        self.labels = torch.from_numpy(arrays.labels).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class ShardBatches(Sampler[torch.Tensor]):
    """One worker's batches of a split, each a tensor of indices: what DistributedSampler
    and a batching DataLoader give, without their per-sample cost.

    With it the DataLoader (batch_size=None) fetches each batch whole from `SplitRows`
    instead of indexing and collating batch_size samples one by one: 0.012 instead of 0.13
    CPU-seconds per epoch of 55,000 images, about 5% of an MLP epoch on one core. Sharding
    as DistributedSampler: the order is shuffled with `seed + epoch` (Lightning calls
    set_epoch, so a resumed run draws the same order), padded by wrapping around so that
    every rank gets as many samples, and rank r takes every world_size-th index from r.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int
    ) -> None:
        super().__init__()
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(size / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - self.size]])
        return iter(order[self.rank : total : self.world_size].split(self.batch_size))


def make_loaders(
    train: SplitArrays,
    val: SplitArrays,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Worker `rank`'s loaders: its shard of the training split in shuffled batches of
    `batch_size` (this worker's share of the global batch), its shard of the validation split
    in batches of EVAL_BATCH, in order."""

    def loader(arrays: SplitArrays, batch: int, shuffle: bool) -> DataLoader[Any]:
        dataset = SplitRows(arrays)
        sampler = ShardBatches(len(dataset), batch, rank, world_size, shuffle, seed)
        # batch_size=None: each index tensor the sampler yields is fetched as one batch.
        return DataLoader(dataset, sampler=sampler, batch_size=None)

    return loader(train, batch_size, True), loader(val, EVAL_BATCH, False)


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
    # Each worker sees 1/num_workers of each split (make_loaders shards, not Lightning).
    context = ray.train.get_context()
    train_loader, val_loader = make_loaders(
        ray.get(data.train),
        ray.get(data.val),
        batch_size=model_config.batch_size // scaling.num_workers,
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        seed=params.seed,
    )

    history = EpochHistory(model_config.epochs)
    trainer = pl.Trainer(
        max_epochs=model_config.epochs,
        accelerator="gpu" if use_gpu else "cpu",
        devices="auto",
        precision="bf16-mixed" if use_gpu else "32-true",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[history, RngState(), RayTrainReportCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the loaders are sharded already
    )
    trainer = prepare_trainer(trainer)
    resume = ray.train.get_checkpoint()
    if resume is None:
        trainer.fit(module, train_loader, val_loader)
    else:
        with resume.as_directory() as folder:
            ckpt, epoch = verified_checkpoint(Path(folder))
            if ray.train.get_context().get_world_rank() == 0:
                log.info("resuming at epoch %d from %s", epoch + 1, resume.path)
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt))
    return {"history": history.rows, "runtime": history.runtime, "timings": history.timings}


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
    # Rank 0's epochs: wall-clock start and training + validation seconds (EpochHistory).
    timings: list[dict[str, float]] = field(default_factory=list)


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
    ray_name: str,
    storage: str,
    recorder: RunRecorder,
) -> Result:
    trainer = TorchTrainer(
        worker_loop,  # type: ignore[arg-type]  # Ray hands rank 0's return value back
        train_loop_config={
            "params": params.model_dump(mode="json"),
            "model": name,
            "use_gpu": use_gpu,
            "data": WorkerData.put(open_prepared(Path(params.paths.prepared))),
        },
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            # Same name and storage as an earlier attempt: Ray resumes from its latest
            # checkpoint (ray.train.get_checkpoint() on the workers).
            name=ray_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=MONITOR, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            # Type checkers see ray.train's V1 RunConfig; at run time it is V2's.
            callbacks=[recorder],  # type: ignore[list-item]
        ),
    )
    return trainer.fit()


def resume_epoch(run_path: str) -> int:
    """The first epoch a resumed run trains: one past its latest committed checkpoint's."""
    try:
        result = Result.from_path(run_path)
    except RuntimeError:  # no folder, or no checkpoint committed yet
        return 0
    except Exception as error:  # Ray's (internal) error for a damaged run snapshot
        raise CheckpointError(
            f"the checkpoints of {run_path} cannot be read ({error}); start a new run "
            "(another --run-name) or remove that folder"
        ) from None
    if result.checkpoint is None:
        return 0
    with result.checkpoint.as_directory() as folder:
        return verified_checkpoint(Path(folder))[1] + 1


def _cause(error: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def _unwrapped(error: Exception) -> Exception:
    """A dead worker found by Ray's health check comes wrapped; its ActorDiedError is inside."""
    inner = getattr(error, "health_check_failure", None)
    return inner if isinstance(inner, Exception) else error


def describe_failure(
    error: TrainingFailedError, name: ModelName, epoch: int, epochs: int, max_failures: int
) -> str:
    """Which worker, which epoch, why: dead workers first, as the others fail because of them."""
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        failures = sorted(
            ((rank, _unwrapped(cause)) for rank, cause in error.worker_failures.items()),
            key=lambda item: (not isinstance(item[1], RayActorError), item[0]),
        )
        causes = "; ".join(f"worker rank {rank}: {_cause(cause)}" for rank, cause in failures)
    else:
        causes = _cause(error)
    return (
        f"training {name} failed in epoch {epoch} (of 0-{epochs - 1}), beyond "
        f"train.max_failures={max_failures}: {causes}"
    )


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

    `run_name` (default: the model's name) identifies the run: an unfinished run of the same
    name, params and data is resumed from its latest checkpoint. Nothing is written to
    `models/` unless training and logging both succeed.
    """
    run_name = run_name or name
    if not RUN_NAME.fullmatch(run_name):
        raise ValueError(f"run name {run_name!r}: use letters, digits, '.', '_' and '-' only")
    paths = params.paths
    data = open_prepared(Path(paths.prepared))
    uri = tracking_uri(settings)
    ensure_reachable(uri)
    epochs = params.train.model(name).epochs
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
        run_params = {
            "ray.num_workers": str(scaling.num_workers),
            "ray.cpus_per_worker": str(params.train.scaling.cpus_per_worker),
            "ray.gpus_per_worker": "1" if use_gpu else "0",
            "ray.cluster": "external" if settings.ray_address else "local",
            "ray.storage_path": storage,
        }
        prepared = Path(paths.prepared)
        with training_run(params, name, uri, prepared, data.digest, run_name, run_params) as run:
            # One Ray run folder per MLflow run: a new MLflow run never picks up old checkpoints.
            ray_name = f"{run_name}-{run.run_id}"
            if run.resumed:
                start = resume_epoch(f"{storage.rstrip('/')}/{ray_name}")
                log.info(
                    "resuming run %s (MLflow run %s) from epoch %d", run_name, run.run_id, start
                )
            client = MlflowClient(uri)
            recorder = RunRecorder(uri, run.run_id, params.train.max_failures)
            try:
                result = _fit(params, name, scaling, use_gpu, ray_name, storage, recorder)
            except TrainingFailedError as error:
                epoch = max(logged_epochs(client, run.run_id), default=-1) + 1
                message = describe_failure(error, name, epoch, epochs, params.train.max_failures)
                mlflow.set_tag(FAILURE_TAG, message)
                raise TrainingError(message) from None
            returned: dict[str, Any] = result.return_value  # type: ignore[attr-defined]
            log.info("workers ran with %s", returned["runtime"])
            mlflow.set_tags({f"runtime.{k}": str(v) for k, v in returned["runtime"].items()})
            history: list[dict[str, float]] = returned["history"]
            # Epochs committed just before an earlier driver died may not have been logged.
            log_new_epochs(client, run.run_id, history)
            state, epoch = _best_network(result)
            best_row = next(row for row in history if int(row["epoch"]) == epoch)
            spec = ModelSpec.describe(
                name,
                params.train.model(name).net,
                data.normalization,
                data.digest,
                epoch=epoch,
                val_accuracy=best_row[MONITOR],
                run_id=run.run_id,
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
    return TrainOutcome(
        model_file, spec, history, returned["runtime"], result.path, returned["timings"]
    )
