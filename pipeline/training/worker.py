"""What runs on each Ray Train worker, apart from the driver: a worker imports this module to
unpickle its training function, and needs neither MLflow nor the driver's export code."""

from __future__ import annotations

import logging
import math
import pickle
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import ray
import ray.train
import torch
from ray.train import CheckpointUploadMode
from ray.train.lightning import (
    RayDDPStrategy,
    RayLightningEnvironment,
    RayTrainReportCallback,
    prepare_trainer,
)
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config.base import ModelName
from pipeline.config.params import parse_params
from pipeline.data.prepared import Normalization, PreparedData, SplitArrays
from pipeline.models.artifact import state_dict_from_lightning
from pipeline.models.module import Classifier
from pipeline.models.networks import build_network
from pipeline.tracking.epochs import EPOCH_METRICS, EPOCH_SECONDS

log = logging.getLogger(__name__)

MONITOR = "val/accuracy"
EVAL_BATCH = 1000


class CheckpointError(RuntimeError):
    """A checkpoint to resume from cannot be read; the message names it."""


class EpochHistory(pl.Callback):
    """Per-epoch metrics, per-rank sample counts and the runtime; history survives resumes.
    Must precede `RayTrainReportCallback`: the counts it logs are part of each report."""

    def __init__(self, total_epochs: int) -> None:
        self.total_epochs = total_epochs
        self.rows: list[dict[str, float]] = []
        self.runtime: dict[str, Any] = {}
        self._samples = 0
        self._started = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        self.runtime = {"backend": backend, "precision": str(trainer.precision)}
        self.runtime |= {"device": str(module.device), "world_size": trainer.world_size}
        self.runtime["torch_threads"] = torch.get_num_threads()

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._samples = 0
        self._started = time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._samples += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        counts = module.all_gather(torch.tensor(self._samples, device=module.device))
        assert isinstance(counts, torch.Tensor)
        per_rank = [float(c) for c in counts.reshape(-1).tolist()]
        # Already global after all_gather; "max" only tells Lightning so.
        for rank, count in enumerate(per_rank):
            module.log(f"train/samples_rank{rank}", count, sync_dist=True, reduce_fx="max")
        module.log("train/samples", sum(per_rank), sync_dist=True, reduce_fx="max")
        elapsed = time.perf_counter() - self._started
        # The slowest rank's training + validation time: what the epoch cost.
        module.log(EPOCH_SECONDS, elapsed, sync_dist=True, reduce_fx="max")
        # The history holds what the training computed; the epoch's seconds reach MLflow with
        # Ray's report (the recorder), so that a rerun of the same seed has the same history.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k != EPOCH_SECONDS}
        row = {"epoch": float(trainer.current_epoch)} | metrics
        self.rows.append(row)
        if trainer.is_global_zero:
            shown = "  ".join(f"{key} {row.get(key, math.nan):.4f}" for key in EPOCH_METRICS)
            epoch = trainer.current_epoch + 1
            log.info("epoch %d/%d  %s  (%.1f s)", epoch, self.total_epochs, shown, elapsed)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


class RngState(pl.Callback):
    """Torch's generators in the checkpoint: a resumed epoch draws what it would have drawn.
    Every rank has the same state (same seed, same draws), so rank 0's fits all."""

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
    """The Lightning file of a Ray checkpoint and its epoch, once it loads: Ray commits only
    copied files, so a damaged one is damaged storage, named here rather than deep in Lightning."""
    path = folder / RayTrainReportCallback.CHECKPOINT_NAME
    try:
        _, epoch = state_dict_from_lightning(path)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {error}") from None
    return path, epoch


def checkpoint_history(path: Path) -> list[dict[str, float]]:
    """The epoch rows a Lightning checkpoint file holds (`EpochHistory`'s state)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return list(payload["callbacks"][EpochHistory(0).state_key]["rows"])


@dataclass(frozen=True)
class WorkerData:
    """The splits in Ray's object store, handed over as a reference (`share`): the controller
    unpickles the training config, and an instance there would import Lightning and torch."""

    train: ray.ObjectRef[SplitArrays]
    val: ray.ObjectRef[SplitArrays]
    normalization: Normalization

    def share(self) -> ray.ObjectRef[WorkerData]:
        return ray.put(self)

    @classmethod
    def of(cls, data: PreparedData, train: SplitArrays | None = None) -> WorkerData:
        """`data`'s splits in the object store (`train`: a subset of its training split)."""
        train = data.load("train") if train is None else train
        return cls(ray.put(train), ray.put(data.load("val")), data.normalization)


class SplitRows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """An item is a whole batch at a tensor of indices: one `index_select` per tensor."""

    def __init__(self, arrays: SplitArrays) -> None:
        self.images = torch.from_numpy(arrays.images)
        self.labels = torch.from_numpy(arrays.labels).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.index_select(0, index), self.labels.index_select(0, index)


class ShardBatches(Sampler[torch.Tensor]):
    """One worker's batches as index tensors: DistributedSampler's sharding (shuffled with
    `seed + epoch`, set by Lightning, so a resume draws the same order; padded by wrapping)
    without the per-sample cost of it and of a batching DataLoader."""

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
    train: SplitArrays, val: SplitArrays, batch_size: int, rank: int, world_size: int, seed: int
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Worker `rank`'s shards: training shuffled in `batch_size`, validation in EVAL_BATCH."""

    def loader(arrays: SplitArrays, batch: int, shuffle: bool) -> DataLoader[Any]:
        dataset = SplitRows(arrays)
        sampler = ShardBatches(len(dataset), batch, rank, world_size, shuffle, seed)
        # batch_size=None: each index tensor the sampler yields is fetched as one batch.
        return DataLoader(dataset, sampler=sampler, batch_size=None)

    return loader(train, batch_size, True), loader(val, EVAL_BATCH, False)


class WorkerStrategy(RayDDPStrategy):
    """No DDP wrapper for a lone worker: with no peer its buckets and all-reduce still cost
    (bench/README.md); collectives (metrics, barriers) still run, on a group of one."""

    def configure_ddp(self) -> None:
        if self.world_size > 1:
            super().configure_ddp()


def _trainer(epochs: int, use_gpu: bool, history: EpochHistory) -> pl.Trainer:
    off = ("enable_checkpointing", "enable_progress_bar", "enable_model_summary", "logger")
    # The loaders are sharded already: no distributed sampler.
    quiet: dict[str, Any] = dict.fromkeys((*off, "use_distributed_sampler"), False)
    # Asynchronous: the checkpoint is copied to storage while the next epoch trains.
    report = RayTrainReportCallback(checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if use_gpu else "cpu",
        devices="auto",
        precision="bf16-mixed" if use_gpu else "32-true",
        strategy=WorkerStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[history, RngState(), report],
        num_sanity_val_steps=0,
        **quiet,
    )


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train this worker's shard; the history and runtime (rank 0's reach the driver)."""
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
    data: WorkerData = ray.get(config["data"])
    net = build_network(
        name, model_config.net.model_dump(), data.normalization.mean, data.normalization.std
    )
    module = Classifier(net, model_config)
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
    trainer = prepare_trainer(_trainer(model_config.epochs, use_gpu, history))
    resume = ray.train.get_checkpoint()
    if resume is None:
        trainer.fit(module, train_loader, val_loader)
    else:
        with resume.as_directory() as folder:
            ckpt, epoch = verified_checkpoint(Path(folder))
            if context.get_world_rank() == 0:
                log.info("resuming at epoch %d from %s", epoch + 1, resume.path)
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt))
    return {"history": history.rows, "runtime": history.runtime}
