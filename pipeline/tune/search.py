"""Hyperparameter search: Ray Tune trials, each a Ray Train run, tracked in MLflow.

`tune_model` is the driver. Each trial runs `pipeline.tune.trial.run_trial` (a Ray Train run
that reports every epoch to Tune); ASHA stops weak trials between epochs; Optuna samples the
space of `params.yaml` (`tune.<model>`, see `pipeline.tune.space`). MLflow holds one parent
run per search and one child run per trial (`pipeline.tune.trial_runs`). The best
configuration is written as a params file (`tune/best_<model>.yaml`) that `dvc exp run -S ...`
applies to the pipeline.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search.optuna import OptunaSearch

from pipeline.config.base import ModelName
from pipeline.config.env import Settings
from pipeline.config.params import Params, ParamsError, parse_params
from pipeline.data.atomic import write_json, write_text
from pipeline.data.prepared import open_prepared
from pipeline.tracking.runs import (
    FAILURE_TAG,
    ensure_experiment,
    ensure_reachable,
    failure_line,
    tracking_uri,
)
from pipeline.training.driver import RUN_NAME
from pipeline.training.ray_env import check_storage, ray_session, resolve_scaling
from pipeline.training.worker import MONITOR, WorkerData
from pipeline.tune.space import (
    apply_command,
    overrides,
    start_points,
    tune_space,
    with_trial_scaling,
)
from pipeline.tune.trial import (
    EPOCHS_DONE,
    TERMINAL,
    ResumingASHA,
    TrialSetup,
    TrialSummary,
    max_concurrent_trials,
    read_trials,
    train_subset,
    trainable,
    trial_dirname,
)
from pipeline.tune.trial_runs import (
    OpenSearch,
    TrialRecorder,
    TrialRuns,
    open_search,
    reconcile,
)

log = logging.getLogger(__name__)

MODE = "max"


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial ended; running the same command resumes it."""


class SearchFailed(RuntimeError):
    """No trial of the search ended with a result."""


@dataclass(frozen=True)
class SearchOutcome:
    search_name: str
    parent_run_id: str
    experiment_path: str
    best_file: Path
    best_trial: str
    best_accuracy: float
    best_config: dict[str, Any]
    trials: int
    stopped_early: int
    failed: int
    restored: bool
    wall_s: float
    apply_command: str


def best_file_text(
    changes: dict[str, Any], search: str, parent_run_id: str, trial: TrialSummary, trials: int
) -> str:
    header = [
        f"# Best of {trials} trials of search {search} (MLflow parent run {parent_run_id}),",
        f"# trial {trial.trial_id}: val/accuracy {trial.best_accuracy:.4f}.",
        "# Written by `mnist-pipeline tune`: the params.yaml keys the search set. To retrain,",
        "# evaluate and register with them (the champion gate decides), run:",
        f"#   {apply_command(changes)}",
    ]
    body = yaml.safe_dump(changes, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body


def make_tuner(
    trainable: Any,
    params: Params,
    name: ModelName,
    search: OpenSearch,
    callback: TrialRuns,
    concurrency: int,
) -> tune.Tuner:
    """A new Tuner for `search`, or its saved one restored (unfinished trials rerun)."""
    if search.restored:
        return tune.Tuner.restore(
            search.path, trainable, resume_unfinished=True, resume_errored=False
        )
    space = params.tune.model(name)
    storage_path, experiment_name = search.path.rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            metric=MONITOR,
            mode=MODE,
            search_alg=OptunaSearch(
                points_to_evaluate=start_points(space) or None, seed=params.seed
            ),
            scheduler=ResumingASHA(
                time_attr=EPOCHS_DONE,
                max_t=space.epochs,
                grace_period=params.tune.scheduler.grace_period,
                reduction_factor=params.tune.scheduler.reduction_factor,
            ),
            num_samples=space.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,  # the callback logs each trial and epoch
        ),
    )


def tune_model(
    params: Params, name: ModelName, settings: Settings, search_name: str | None = None
) -> SearchOutcome:
    """Run (or resume) the search for `name`; write the best configuration found.

    `search_name` (default `tune-<model>`) identifies the search: an unfinished search of the
    same name, space, params and data is restored from its Tune state (finished trials are not
    rerun); otherwise a new search starts.
    """
    started = time.monotonic()
    search_name = search_name or f"tune-{name}"
    if not RUN_NAME.fullmatch(search_name):
        raise ValueError(f"search name {search_name!r}: use letters, digits, '.', '_', '-' only")
    space = params.tune.model(name)
    data = open_prepared(Path(params.paths.prepared))
    uri = tracking_uri(settings)
    ensure_reachable(uri)
    ensure_experiment(uri, params.mlflow.experiment)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert experiment is not None
    trial_base = parse_params(with_trial_scaling(params), "params with tune.scaling")
    train = train_subset(data.load("train"), params.tune.train_limit, params.seed)
    with ray_session(settings.ray_address):
        use_gpu = _trial_gpus(trial_base)
        storage = check_storage(params.train.storage_path)
        concurrency = max_concurrent_trials(params, use_gpu, space.num_samples)
        search = open_search(
            client,
            experiment.experiment_id,
            params,
            name,
            data.digest,
            concurrency,
            storage,
            search_name,
        )
        setup = TrialSetup(
            params=params.model_dump(mode="json"),
            model=name,
            use_gpu=use_gpu,
            data=WorkerData.of(data, train).share(),
            train_storage=f"{search.path}/train",
        )
        recorder = TrialRecorder(
            uri,
            experiment.experiment_id,
            search.parent_run_id,
            search_name,
            name,
            space.epochs,
            params.model_dump(mode="json"),
            params.tune.train_limit,
        )
        tuner = make_tuner(trainable(setup), params, name, search, TrialRuns(recorder), concurrency)
        _fit(tuner, client, search.parent_run_id)
    trials = reconcile(recorder, read_trials(search.path))
    return _conclude(client, recorder, params, name, search, trials, started)


def _trial_gpus(trial_base: Params) -> bool:
    """Whether trials use GPUs; a bad `tune.scaling` named as such."""
    try:
        return resolve_scaling(trial_base)
    except ParamsError as error:
        raise ParamsError(str(error).replace("train.scaling:", "tune.scaling:", 1)) from None


def _fit(tuner: tune.Tuner, client: MlflowClient, parent_id: str) -> None:
    """Fit; an interrupted search's parent run ends KILLED (resumable), a failed one FAILED."""
    try:
        tuner.fit()
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(parent_id, status="KILLED")
        raise
    except BaseException as error:
        client.set_tag(parent_id, FAILURE_TAG, failure_line(error))
        client.set_terminated(parent_id, status="FAILED")
        raise


def _ended(
    client: MlflowClient, search: OpenSearch, trials: list[TrialSummary], num_samples: int
) -> tuple[list[TrialSummary], list[TrialSummary]]:
    """(the trials that finished with results, those that failed); raises, ending the parent
    run, when the search was interrupted or no trial has a result."""
    ended = [t for t in trials if t.status in TERMINAL]
    if len(ended) < num_samples:
        client.set_terminated(search.parent_run_id, status="KILLED")
        raise SearchInterrupted(
            f"search {search.name} interrupted: {len(ended)} of {num_samples} trials "
            "ended; run the same command again to resume it (finished trials are kept)"
        )
    finished = [t for t in ended if t.status == Trial.TERMINATED and t.rows]
    failed = [t for t in ended if t.status == Trial.ERROR]
    if not finished:
        client.set_tag(
            search.parent_run_id, FAILURE_TAG, failed[0].error if failed else "no results"
        )
        client.set_terminated(search.parent_run_id, status="FAILED")
        first = f" (first failure: trial {failed[0].trial_id}: {failed[0].error})" if failed else ""
        raise SearchFailed(f"search {search.name}: no trial produced a result{first}")
    return finished, failed


def _conclude(
    client: MlflowClient,
    recorder: TrialRecorder,
    params: Params,
    name: ModelName,
    search: OpenSearch,
    trials: list[TrialSummary],
    started: float,
) -> SearchOutcome:
    """Write the best file and its summary; record them in the parent run, which ends."""
    space = params.tune.model(name)
    finished, failed = _ended(client, search, trials, space.num_samples)
    best = max(finished, key=lambda t: t.best_accuracy)
    changes = overrides(space, name, best.config)
    best_file = Path(params.paths.tune) / f"best_{name}.yaml"
    write_text(
        best_file, best_file_text(changes, search.name, search.parent_run_id, best, len(trials))
    )
    outcome = SearchOutcome(
        search_name=search.name,
        parent_run_id=search.parent_run_id,
        experiment_path=search.path,
        best_file=best_file,
        best_trial=best.trial_id,
        best_accuracy=best.best_accuracy,
        best_config=changes,
        trials=len(trials),
        stopped_early=sum(t.epochs < space.epochs for t in finished),
        failed=len(failed),
        restored=search.restored,
        wall_s=time.monotonic() - started,
        apply_command=apply_command(changes),
    )
    epochs_trained = sum(t.epochs for t in trials if t.status in TERMINAL)
    write_json(best_file.with_suffix(".json"), summary(outcome, name, epochs_trained))
    best_child = recorder.find(best.trial_id)
    _record_outcome(
        client, outcome, trials, epochs_trained, best_child.info.run_id if best_child else ""
    )
    return outcome


def summary(outcome: SearchOutcome, name: ModelName, epochs_trained: int) -> dict[str, Any]:
    """`tune/best_<model>.json`: the metrics DVC shows for the search."""
    return {
        "model": name,
        "search": outcome.search_name,
        "parent_run_id": outcome.parent_run_id,
        "best_trial": outcome.best_trial,
        "best_val_accuracy": round(outcome.best_accuracy, 6),
        "trials": outcome.trials,
        "stopped_early": outcome.stopped_early,
        "failed": outcome.failed,
        "epochs_trained": epochs_trained,
        "wall_s_last_session": round(outcome.wall_s, 1),
    }


def _record_outcome(
    client: MlflowClient,
    outcome: SearchOutcome,
    trials: list[TrialSummary],
    epochs_trained: int,
    best_run_id: str,
) -> None:
    parent_id, now = outcome.parent_run_id, int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            Metric("best/val_accuracy", outcome.best_accuracy, now, 0),
            Metric("trials/total", float(outcome.trials), now, 0),
            Metric("trials/stopped_early", float(outcome.stopped_early), now, 0),
            Metric("trials/failed", float(outcome.failed), now, 0),
            Metric("trials/epochs_trained", float(epochs_trained), now, 0),
        ],
        tags=[
            RunTag("tune.best_trial_id", outcome.best_trial),
            RunTag("tune.best_run_id", best_run_id),
            RunTag("tune.best_config", json.dumps(outcome.best_config, sort_keys=True)),
            RunTag("tune.best_params_file", str(outcome.best_file)),
            RunTag("tune.apply_command", outcome.apply_command),
        ],
    )
    client.log_artifact(parent_id, str(outcome.best_file), "tune")
    listed = [
        {
            "trial_id": t.trial_id,
            "status": t.status,
            "epochs": t.epochs,
            "best_val_accuracy": t.best_accuracy if t.rows else None,
            "config": t.config,
            "error": t.error,
        }
        for t in trials
    ]
    client.log_dict(parent_id, {"trials": listed}, "tune/trials.json")
    client.set_terminated(parent_id, status="FINISHED")
