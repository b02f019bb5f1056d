"""MLflow runs: where they go, what a training run records, and when one is resumed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.compat.dvc import folder_hash
from pipeline.config.base import ModelName
from pipeline.config.env import Settings
from pipeline.config.params import Params, leaves
from pipeline.data.prepared import open_prepared
from pipeline.tracking.epochs import RESTARTS_TAG
from pipeline.tracking.lineage import git_commit

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def tracking_uri(settings: Settings) -> str:
    """`MLFLOW_TRACKING_URI` or the project's SQLite store, made absolute for Ray's workers."""
    uri = settings.mlflow_tracking_uri or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def _health(uri: str) -> int:
    """The status of the server's `/health`, which needs no credentials."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code


def ensure_reachable(uri: str) -> None:
    """Fail before any expensive work when the server is down or refuses our credentials."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {folder} does not exist")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        health = _health(uri)
    except OSError as error:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({getattr(error, 'reason', error)}); "
            "start it or set MLFLOW_TRACKING_URI to a reachable server"
        ) from None
    if health != 200:
        raise TrackingError(f"MLflow tracking server {uri} answered {health}")
    # MLflow's client authenticates from its own variables; one try, not minutes of retries.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    try:
        with mock.patch.dict(os.environ, quick):  # MLflow reads them at each request
            MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as error:
        status = error.get_http_status_code()
        if status not in (401, 403):
            raise TrackingError(f"MLflow tracking server {uri}: {error.message[:300]}") from None
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"user {user!r} (MLFLOW_TRACKING_USERNAME)" if user else "no credentials"
        raise TrackingError(
            f"MLflow tracking server {uri} refused {who}: {status}; check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ) from None


def wait_for_tracking(uri: str, budget_s: float) -> None:
    """Until the tracking server answers again, at most `budget_s`; backing off to 5 s between
    health checks (cheap for the server), so a server back is used within seconds."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline, pause = time.monotonic() + budget_s, 1.0
    while True:
        try:
            if _health(uri) == 200:
                return
        except OSError as error:
            problem = str(getattr(error, "reason", error))
        else:
            problem = "not healthy"
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrackingError(
                f"MLflow tracking server {uri} unreachable for {budget_s:.0f} s after training "
                f"({problem}; TRACKING_WAIT_S)"
            )
        log.warning("MLflow at %s: %s; retrying in %.0f s", uri, problem, min(pause, left))
        time.sleep(min(pause, left))
        pause = min(pause * 2, 5.0)


def flatten(tree: dict[str, Any]) -> dict[str, str]:
    """`leaves` as MLflow params: strings, lists as JSON."""
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in leaves(tree).items()}


def stage_params(params: Params, name: ModelName) -> dict[str, str]:
    """Exactly the params the train stage of `name` reads (as dvc.yaml lists them)."""
    dumped = params.model_dump(mode="json")
    train = {key: dumped["train"][key] for key in ("scaling", "max_failures", name)}
    return flatten({"seed": dumped["seed"], "prepare": dumped["prepare"], "train": train})


# The MLflow UI opens an experiment of this kind on its runs, not on the GenAI overview.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as a run's description


def ensure_experiment(uri: str, name: str) -> None:
    """Create the experiment if missing (of our kind); a SQLite store's artifacts beside it,
    not in ./mlruns of whatever the working directory is."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if KIND_TAG not in found.tags:  # made before experiments were tagged
            client.set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
        return
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    try:
        client.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
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


def latest_run(client: MlflowClient, experiment_id: str, filter_string: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def previous_run(
    client: MlflowClient, experiment_id: str, name: ModelName, run_name: str
) -> Run | None:
    """The latest run of model `name` under `run_name` ([A-Za-z0-9._-]: no quoting), if any."""
    where = f"params.`{RUN_NAME_PARAM}` = '{run_name}' and tags.model_type = '{name}'"
    return latest_run(client, experiment_id, where)


def unfinished_decision(
    previous: Run | None, kind: str, name: str, mismatch: Callable[[Run], str | None]
) -> tuple[str | None, str]:
    """(run id to resume or None, why), for train and tune alike: only an unfinished run, and
    only when `mismatch(previous)` finds nothing that differs."""
    if previous is None:
        return None, f"no earlier {kind} of that name"
    label = f"{kind} {name} (MLflow run {previous.info.run_id})"
    if previous.info.status not in _UNFINISHED:
        return None, f"{label} is {previous.info.status}: a finished {kind} is never resumed"
    differs = mismatch(previous)
    if differs:
        return None, f"{label} is unfinished but {differs}"
    return previous.info.run_id, f"{label} is {previous.info.status}"


def resume_decision(
    previous: Run | None, run_params: dict[str, str], data_digest: str
) -> tuple[str | None, str]:
    """`unfinished_decision` for a training run: same params, Ray scaling, storage and data."""

    def mismatch(run: Run) -> str | None:
        before = run.data.params
        keys = run_params.keys() | before.keys()
        changed = sorted(k for k in keys if before.get(k) != run_params.get(k))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)} -> {run_params.get(k)}" for k in changed[:5])
            return f"had other parameters ({shown})"
        if run.data.tags.get("data.digest") != data_digest:
            return "trained on other data"
        return None

    return unfinished_decision(previous, "run", run_params[RUN_NAME_PARAM], mismatch)


def failure_line(error: BaseException | str, limit: int = 300) -> str:
    """One line for the failure tag: an exception's type and first line, or a text trace's
    last line (Tune keeps a trial's error as text, Ray puts the cause last)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, str):
        text = lines[-1] if lines else "unknown error"
    else:
        text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    """The driver's MLflow run: the unfinished one of the same name, params and data (see
    `resume_decision`), else a new one; FINISHED when the block succeeds, FAILED if it raises."""
    mlflow.set_tracking_uri(uri)
    ensure_experiment(uri, params.mlflow.experiment)
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    logged = stage_params(params, name) | run_params | {RUN_NAME_PARAM: run_name}
    previous = previous_run(MlflowClient(uri), experiment.experiment_id, name, run_name)
    resume_id, why = resume_decision(previous, logged, data_digest)
    if previous is not None:
        log.info("%s: %s", why, "resuming it" if resume_id else "starting a new run")
    new_name = None if resume_id else f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = mlflow.start_run(run_id=resume_id, run_name=new_name, log_system_metrics=True)
    try:
        yield _open(
            run.info.run_id, previous if resume_id else None, logged, name, prepared, data_digest
        )
    except BaseException:
        # The block's error is the one to report: a tracking server that is down cannot take
        # the FAILED status either, and its run stays unfinished, to be resumed.
        with contextlib.suppress(MlflowException, OSError):
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _open(
    run_id: str,
    previous: Run | None,
    logged: dict[str, str],
    name: ModelName,
    prepared: Path,
    data_digest: str,
) -> OpenRun:
    tags = {"git_commit": git_commit()}
    if previous is not None:
        resumes = int(previous.data.tags.get(RESUMES_TAG, "0")) + 1
        mlflow.set_tags(tags | {RESUMES_TAG: str(resumes)})
        if FAILURE_TAG in previous.data.tags:  # it described the attempt that stopped
            mlflow.delete_tag(FAILURE_TAG)
        return OpenRun(run_id, resumed=True)
    # Params first: a run killed right after this can still be matched when resumed.
    mlflow.log_params(logged)
    mlflow.set_tags(
        tags | {"model_type": name, "data.digest": data_digest, RESTARTS_TAG: "0", RESUMES_TAG: "0"}
    )
    train = open_prepared(prepared).load("train")
    dataset = from_numpy(
        train.images,
        targets=train.labels,
        source=str(prepared.resolve()),
        name="mnist-prepared",
        digest=folder_hash(prepared),
    )
    mlflow.log_input(dataset, context="training")
    return OpenRun(run_id, resumed=False)
