"""MLflow tracking: where runs go, what a training run records, and the logged model."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from torch import nn

from pipeline.config import ModelName, Params
from pipeline.data import SplitArrays
from pipeline.figures import confusion_figure, curves_figure, misclassified_figure
from pipeline.models.networks import IMAGE_SIZE, NUM_CLASSES, Probabilities
from pipeline.run_log import RESTARTS_TAG
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.evaluate import Evaluation

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_ARTIFACT = "model"
MANIFEST_TAG = "model.files_sha256"
INPUT_CONTRACT = (
    "images: float32 array (N, 28, 28), grayscale, pixel values in [0, 1], raw (the model "
    "normalises); output: float32 (N, 10) class probabilities, predicted digit = argmax"
)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def tracking_uri(settings: Settings) -> str:
    """`MLFLOW_TRACKING_URI`, or the project's SQLite store; relative SQLite paths made absolute
    so Ray workers (other working directories) write to the same file."""
    uri = settings.mlflow_tracking_uri or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def ensure_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any expensive work, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as reply:
                if reply.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered {reply.status}")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it or set "
                "MLFLOW_TRACKING_URI to a reachable server"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist")


def git_commit() -> str:
    """HEAD's commit, marked `-dirty` when tracked files differ from it; in a Ray job (whose
    upload has no .git) the commit `submit` read where the job was submitted."""
    submitted = Settings().pipeline_git_commit
    if submitted:
        return submitted
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def dvc_hash(folder: Path) -> str:
    """The hash DVC records for `folder` in dvc.lock (`<md5>.dir`), computed the same way."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(LocalHashFileDB(fs, scratch), str(folder), fs, "md5", dry_run=True)
    return str(obj.hash_info.value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists stay whole."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def stage_params(params: Params, name: ModelName) -> dict[str, str]:
    """Exactly the params the train stage of `name` reads (as dvc.yaml lists them)."""
    dumped = params.model_dump(mode="json")
    return flatten(
        {
            "seed": dumped["seed"],
            "prepare": dumped["prepare"],
            "train": {
                "scaling": dumped["train"]["scaling"],
                "max_failures": dumped["train"]["max_failures"],
                name: dumped["train"][name],
            },
        }
    )


def ensure_experiment(uri: str, name: str) -> None:
    """Create the experiment if missing; a SQLite store keeps its artifacts beside it
    (MLflow's default, ./mlruns of whatever the working directory is, scatters them)."""
    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is not None:
        return
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    try:
        client.create_experiment(name, artifact_location=location)
    except MlflowException as error:  # created meanwhile by a concurrent run
        if "already exists" not in str(error).lower():
            raise


RUN_NAME_PARAM = "ray.run_name"
RESUMES_TAG = "run.resumes"
FAILURE_TAG = "failure"
_UNFINISHED = {"RUNNING", "FAILED", "KILLED", "SCHEDULED"}


@dataclass(frozen=True)
class OpenRun:
    run_id: str
    resumed: bool


def previous_run(
    client: MlflowClient, experiment_id: str, name: ModelName, run_name: str
) -> Run | None:
    """The latest run of model `name` under `run_name`, if any (deleted runs are not seen)."""
    runs = client.search_runs(
        [experiment_id],
        # run_name is restricted to [A-Za-z0-9._-], so it needs no escaping here.
        filter_string=f"params.`{RUN_NAME_PARAM}` = '{run_name}' and tags.model_type = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def resume_decision(
    previous: Run | None, run_params: dict[str, str], data_digest: str
) -> tuple[str | None, str]:
    """(the run id to resume or None, why): only an unfinished run of the same params, Ray
    scaling, storage and data is resumed; anything else starts a new run."""
    if previous is None:
        return None, "no earlier run of that name"
    label = f"run {run_params[RUN_NAME_PARAM]} (MLflow run {previous.info.run_id})"
    if previous.info.status not in _UNFINISHED:
        return None, f"{label} is {previous.info.status}: a finished run is never resumed"
    before = previous.data.params
    changed = sorted(
        k for k in run_params.keys() | before.keys() if before.get(k) != run_params.get(k)
    )
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)} -> {run_params.get(k)}" for k in changed[:5])
        return None, f"{label} is unfinished but had other parameters ({shown})"
    if previous.data.tags.get("data.digest") != data_digest:
        return None, f"{label} is unfinished but trained on other data"
    return previous.info.run_id, f"{label} is {previous.info.status}"


@contextmanager
def training_run(
    params: Params,
    name: ModelName,
    uri: str,
    prepared: Path,
    data_digest: str,
    run_name: str,
    run_params: dict[str, str],
) -> Iterator[OpenRun]:
    """Open the one MLflow run of this training (the driver's): the unfinished run of the same
    name, params and data if there is one (see `resume_decision`), else a new run.

    The run ends FINISHED when the block succeeds, FAILED when it raises.
    """
    mlflow.set_tracking_uri(uri)
    ensure_experiment(uri, params.mlflow.experiment)
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    logged = stage_params(params, name) | run_params | {RUN_NAME_PARAM: run_name}
    previous = previous_run(MlflowClient(uri), experiment.experiment_id, name, run_name)
    resume_id, why = resume_decision(previous, logged, data_digest)
    if previous is not None:
        log.info("%s: %s", why, "resuming it" if resume_id else "starting a new run")
    with mlflow.start_run(
        run_id=resume_id,
        run_name=None if resume_id else f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        log_system_metrics=True,
    ) as run:
        tags = {"git_commit": git_commit()}
        if previous is not None and resume_id:
            resumes = int(previous.data.tags.get(RESUMES_TAG, "0")) + 1
            mlflow.set_tags(tags | {RESUMES_TAG: str(resumes)})
            if FAILURE_TAG in previous.data.tags:  # it described the attempt that stopped
                mlflow.delete_tag(FAILURE_TAG)
            yield OpenRun(run.info.run_id, resumed=True)
            return
        # Params first: a run killed right after this can still be matched when resumed.
        mlflow.log_params(logged)
        mlflow.set_tags(
            tags
            | {"model_type": name, "data.digest": data_digest, RESTARTS_TAG: "0", RESUMES_TAG: "0"}
        )
        dataset = MetaDataset(  # type: ignore[abstract]  # concrete at run time
            source=resolve_dataset_source(str(prepared.resolve())),
            name="mnist-prepared",
            digest=dvc_hash(prepared),
        )
        mlflow.log_input(dataset, context="training")
        yield OpenRun(run.info.run_id, resumed=False)


def signature() -> ModelSignature:
    """The one input contract, as MLflow states it.

    Unnamed tensors: a named input makes pyfunc hand the flavor a dict, which it refuses.
    """
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


# Written by MLflow into each download of a `models:/` URI, so it differs per download.
_DOWNLOAD_NOTE = "registered_model_meta"


def files_sha256(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a downloaded model under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != _DOWNLOAD_NOTE
    }


def log_model(net: nn.Module, example: np.ndarray, metadata: dict[str, Any]) -> str:
    """Log `net` (as probabilities) pickle-free into the active run; return its model URI.

    The uploaded files' SHA-256 go into a run tag, so a later download can be verified.
    """
    info = mlflow.pytorch.log_model(
        Probabilities(net).eval(),
        name=MODEL_ARTIFACT,
        serialization_format="pt2",
        signature=signature(),
        input_example=example.astype(np.float32),
        metadata=metadata | {"input_contract": INPUT_CONTRACT},
        # Stated, not inferred: inference reloads the model in a subprocess (slow) and keeps
        # torch's `+cpu` label, which PyPI cannot resolve.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}",
        ],
    )
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=scratch))
        mlflow.set_tag(MANIFEST_TAG, json.dumps(files_sha256(local), sort_keys=True))
    return str(info.model_uri)


def log_training_curves(history: list[dict[str, float]], name: ModelName) -> None:
    """The curves as a figure in the active run."""
    figure = curves_figure(history, f"{name} training")
    mlflow.log_figure(figure, "training/curves.png")
    plt.close(figure)


def log_evaluation(
    uri: str,
    run_id: str,
    evaluation: Evaluation,
    test: SplitArrays,
    grid_size: int,
) -> None:
    """Test metrics and evaluation figures into the run that trained the model."""
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException as error:
        raise TrackingError(f"MLflow run {run_id} not found at {uri}: {error.message}") from None
    now = int(time.time() * 1000)
    metrics = [Metric("test/accuracy", evaluation.accuracy, now, 0)]
    metrics.append(Metric("test/loss", evaluation.loss, now, 0))
    metrics += [
        Metric(f"test/accuracy_{digit}", value, now, 0)
        for digit, value in evaluation.per_class_accuracy.items()
    ]
    client.log_batch(run_id, metrics=metrics)
    client.log_table(
        run_id,
        data={
            "digit": list(evaluation.per_class_accuracy),
            "accuracy": list(evaluation.per_class_accuracy.values()),
            "support": evaluation.confusion.sum(axis=1).tolist(),
        },
        artifact_file="evaluation/per_class_accuracy.json",
    )
    for figure, path in (
        (confusion_figure(evaluation.confusion, "test confusion matrix"), "confusion_matrix.png"),
        (
            misclassified_figure(test.images, test.labels, evaluation.predictions, grid_size),
            "misclassified.png",
        ),
    ):
        client.log_figure(run_id, figure, f"evaluation/{path}")
        plt.close(figure)
