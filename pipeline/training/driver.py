"""Train stage: the driver starts Ray Train workers (`pipeline.training.worker`) inside one
MLflow run; the best checkpoint becomes `models/<name>/`."""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from ray.exceptions import RayActorError
from ray.train import (
    CheckpointConfig,
    ControllerError,
    Result,
    TrainingFailedError,
    WorkerGroupError,
)
from ray.train.lightning import RayTrainReportCallback

from pipeline.compat.ray import health_check_cause
from pipeline.config.base import ModelName
from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.data.atomic import write_text
from pipeline.data.prepared import PreparedData, open_prepared
from pipeline.models.artifact import ModelSpec, save_model, state_dict_from_lightning
from pipeline.tracking.epochs import log_new_epochs, logged_epochs
from pipeline.tracking.figures import log_training_curves
from pipeline.tracking.model_log import log_model
from pipeline.tracking.runs import (
    DESCRIPTION_TAG,
    FAILURE_TAG,
    TrackingError,
    failure_line,
    training_run,
    wait_for_tracking,
)
from pipeline.training.ray_env import (
    check_storage,
    preflight,
    ray_session,
    resolve_scaling,
)
from pipeline.training.recorder import RunRecorder
from pipeline.training.trainer import build_trainer
from pipeline.training.worker import (
    MONITOR,
    CheckpointError,
    WorkerData,
    checkpoint_history,
    verified_checkpoint,
)

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train/loss", "val/loss", "val/accuracy")
# Also a folder name under train.storage_path and an MLflow search value: no quoting needed.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
CAUSE_LIMIT = 160  # per worker: the message names every failed worker
CHECKPOINTS = CheckpointConfig(
    num_to_keep=2, checkpoint_score_attribute=MONITOR, checkpoint_score_order="max"
)


class TrainingError(RuntimeError):
    """Training failed beyond `train.max_failures`; the message names rank, epoch and cause."""


@dataclass(frozen=True)
class TrainOutcome:
    model_file: Path
    spec: ModelSpec
    history: list[dict[str, float]]
    runtime: dict[str, Any]
    run_path: str


def history_csv(history: list[dict[str, float]]) -> str:
    """The curves DVC plots: one row per epoch."""
    rows = [[int(r["epoch"]), *(f"{r[k]:.6f}" for k in HISTORY_COLUMNS[1:])] for r in history]
    buffer = io.StringIO()
    csv.writer(buffer).writerows([HISTORY_COLUMNS, *rows])
    return buffer.getvalue()


def resume_point(run_path: str) -> tuple[int, list[dict[str, float]]]:
    """The first epoch a resumed run trains (one past its latest committed checkpoint's) and
    the history that checkpoint holds."""
    try:
        result = Result.from_path(run_path)
    except RuntimeError:  # no folder, or no checkpoint committed yet
        return 0, []
    except Exception as error:  # Ray's (internal) error for a damaged run snapshot
        raise CheckpointError(
            f"the checkpoints of {run_path} cannot be read ({error}); start a new run "
            "(another --run-name) or remove that folder"
        ) from None
    if result.checkpoint is None:
        return 0, []
    with result.checkpoint.as_directory() as folder:
        path, epoch = verified_checkpoint(Path(folder))
        return epoch + 1, checkpoint_history(path)


def describe_failure(
    error: TrainingFailedError, name: ModelName, epoch: int, epochs: int, max_failures: int
) -> str:
    """Which worker, which epoch, why: dead workers first, as the others fail because of them."""
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        failures = sorted(
            ((rank, health_check_cause(cause)) for rank, cause in error.worker_failures.items()),
            key=lambda item: (not isinstance(item[1], RayActorError), item[0]),
        )
        causes = "; ".join(
            f"worker rank {rank}: {failure_line(cause, CAUSE_LIMIT)}" for rank, cause in failures
        )
    elif isinstance(error, ControllerError):
        # The controller fails on its own writes to storage: its cause names the store, its
        # first line would only say "controller error".
        cause = failure_line(error.controller_failure, 2 * CAUSE_LIMIT)
        causes = f"Ray Train's controller: {cause}"
    else:
        causes = failure_line(error, CAUSE_LIMIT)
    return (
        f"training {name} failed in epoch {epoch} (of 0-{epochs - 1}), beyond "
        f"train.max_failures={max_failures}: {causes}"
    )


def _ray_params(settings: Settings, params: Params, use_gpu: bool, storage: str) -> dict[str, str]:
    """What the MLflow run records of Ray, and a resumed run must match."""
    scaling = params.train.scaling
    found = {f"ray.{k}": str(getattr(scaling, k)) for k in ("num_workers", "cpus_per_worker")}
    found["ray.gpus_per_worker"] = "1" if use_gpu else "0"
    found["ray.cluster"] = "external" if settings.ray_address else "local"
    return found | {"ray.storage_path": storage}


def _export(
    params: Params, name: ModelName, data: PreparedData, result: Result, run_id: str
) -> TrainOutcome:
    returned: dict[str, Any] = result.return_value  # type: ignore[attr-defined]
    log.info("workers ran with %s", returned["runtime"])
    mlflow.set_tags({f"runtime.{k}": str(v) for k, v in returned["runtime"].items()})
    history: list[dict[str, float]] = returned["history"]
    # Epochs committed just before an earlier driver died may not have been logged.
    log_new_epochs(MlflowClient(mlflow.get_tracking_uri()), run_id, history)
    best = result.get_best_checkpoint(MONITOR, "max")
    if best is None:
        raise RuntimeError(f"training reported no checkpoint (run at {result.path})")
    with best.as_directory() as folder:
        state, epoch = state_dict_from_lightning(
            Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
        )
    accuracy = next(row[MONITOR] for row in history if int(row["epoch"]) == epoch)
    net_config = params.train.model(name).net
    spec = ModelSpec.describe(
        name, net_config, data.normalization, data.digest, epoch, accuracy, run_id
    )
    net = spec.build().eval()
    net.load_state_dict(state)
    mlflow.log_metrics({"best/val_accuracy": spec.val_accuracy, "best/epoch": epoch})
    example = data.load("val").images[:2].astype(np.float32) / 255.0
    log_training_curves(history, name)
    model_uri = log_model(net, example, spec.model_dump(mode="json"))
    epochs = params.train.model(name).epochs
    description = (
        f"{name}: best val/accuracy {accuracy:.4f} at epoch {epoch} (of 0-{epochs - 1}), "
        f"prepared data {data.digest}; logged as {model_uri}"
    )
    mlflow.set_tags({"model_uri": model_uri, DESCRIPTION_TAG: description})
    model_file = save_model(Path(params.paths.models) / name, net, spec)
    write_text(Path(params.paths.plots) / name / "history.csv", history_csv(history))
    return TrainOutcome(model_file, spec, history, returned["runtime"], result.path)


def train_model(
    params: Params, name: ModelName, settings: Settings, run_name: str | None = None
) -> TrainOutcome:
    """Train `name` in one MLflow run (an unfinished one of the same `run_name`, params and data
    resumes from its checkpoint); `models/` is written only once training and logging succeed."""
    run_name = run_name or name
    if not RUN_NAME.fullmatch(run_name):
        raise ValueError(f"run name {run_name!r}: use letters, digits, '.', '_' and '-' only")
    prepared = Path(params.paths.prepared)
    data = open_prepared(prepared)
    uri = preflight(params, settings)
    with ray_session(settings.ray_address):
        use_gpu = resolve_scaling(params)
        scaling = params.train.scaling
        storage = check_storage(params.train.storage_path)
        log.info(
            "training %s on %d Ray worker(s), %d CPU(s)%s each",
            name,
            scaling.num_workers,
            scaling.cpus_per_worker,
            " + 1 GPU" if use_gpu else "",
        )
        run_params = _ray_params(settings, params, use_gpu, storage)
        with training_run(params, name, uri, prepared, data.digest, run_name, run_params) as run:
            # One Ray run folder per MLflow run: a new MLflow run never picks up old checkpoints.
            ray_name = f"{run_name}-{run.run_id}"
            if run.resumed:
                start, committed = resume_point(f"{storage.rstrip('/')}/{ray_name}")
                # Epochs Ray committed just before the last driver died, unlogged by then: now,
                # before the next ones, so that the run's steps stay in order.
                log_new_epochs(MlflowClient(uri), run.run_id, committed)
                log.info(
                    "resuming run %s (MLflow run %s) from epoch %d", run_name, run.run_id, start
                )
            recorder = RunRecorder(uri, run.run_id, params.train.max_failures)
            shared = WorkerData.of(data).share()
            trainer = build_trainer(
                params, name, use_gpu, shared, ray_name, storage, CHECKPOINTS, [recorder]
            )
            try:
                result = trainer.fit()
            except TrainingFailedError as error:
                epoch = max(logged_epochs(MlflowClient(uri), run.run_id), default=-1) + 1
                epochs, budget = params.train.model(name).epochs, params.train.max_failures
                message = describe_failure(error, name, epoch, epochs, budget)
                mlflow.set_tags({FAILURE_TAG: message, DESCRIPTION_TAG: f"failed: {message}"})
                raise TrainingError(message) from None
            try:
                wait_for_tracking(uri, settings.tracking_wait_s)
            except TrackingError as error:
                raise TrackingError(
                    f"{error}; nothing written to {params.paths.models}/, the checkpoints stay "
                    f"in {storage}: rerun the same command to finish run {run.run_id}"
                ) from None
            return _export(params, name, data, result, run.run_id)
