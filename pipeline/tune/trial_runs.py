"""MLflow: a parent run per search, a child run per trial written live by `TrialRecorder` and
made to agree with Tune's saved state by `reconcile`: each trial recorded once, across kills.
Not Ray's `MLflowLoggerCallback`, which in Ray 2.60 (ray/air/integrations/mlflow.py:305-340)
keeps its trial -> run map in memory only (a restored search opens a second run per trial),
logs at step `training_iteration` (restarts on resume; here step = epoch), logs Tune's config,
not the params.yaml keys, and knows no parent run nor ASHA's early stops."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from math import inf, nan
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.experiment import Trial

from pipeline.config.base import ModelName
from pipeline.config.params import Params, parse_params
from pipeline.tracking.epochs import EPOCH_METRICS, log_new_epochs, logged_history
from pipeline.tracking.lineage import git_commit
from pipeline.tracking.runs import (
    FAILURE_TAG,
    ensure_experiment,
    flatten,
    latest_run,
    stage_params,
    unfinished_decision,
)
from pipeline.training.ray_env import check_storage
from pipeline.training.worker import MONITOR
from pipeline.tune.space import describe_space, fingerprint, trial_params, tune_section
from pipeline.tune.trial import EPOCHS_DONE, TrialSummary, epoch_rows, read_trials

log = logging.getLogger(__name__)

ROLE_TAG = "tune.role"  # "search" (the parent run) or "trial" (a child run)
SEARCH_TAG = "tune.search"
TRIAL_TAG = "tune.trial_id"
FINGERPRINT_TAG = "tune.fingerprint"
PATH_TAG = "tune.experiment_path"
STOPPED_TAG = "tune.stopped_early"
PARENT_TAG = "mlflow.parentRunId"
RUN_STATUS = {Trial.TERMINATED: "FINISHED", Trial.ERROR: "FAILED"}  # else KILLED: resumable


def summary_metrics(rows: list[dict[str, float]]) -> list[Metric]:
    if not rows:
        return []
    best, last = max(rows, key=lambda row: row.get(MONITOR, -inf)), rows[-1]
    now = int(time.time() * 1000)
    values = {f"final/{k.replace('/', '_')}": last[k] for k in EPOCH_METRICS if k in last}
    values |= {"best/val_accuracy": best.get(MONITOR, nan), "best/epoch": best["epoch"]}
    values["epochs_trained"] = float(len(rows))
    return [Metric(k, v, now, 0) for k, v in values.items()]


@dataclass(eq=False)  # a stateful callback: equal to itself only
class TrialRecorder(tune.Callback):
    """The MLflow runs of one search: live as a Tune callback (a failing call is logged and
    left to `reconcile`), and by `reconcile`."""

    uri: str
    experiment_id: str
    parent_run_id: str
    search_name: str
    model: ModelName
    epochs: int
    params: dict[str, Any]  # the search's params, as a mapping
    train_limit: int | None
    path: str = ""  # the Tune experiment
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # trial id -> child run id

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def find(self, trial_id: str) -> Run | None:
        parent, trial = f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", f"tags.`{TRIAL_TAG}`"
        return latest_run(self.client, self.experiment_id, f"{parent} and {trial} = '{trial_id}'")

    def run_id(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run, created with its params if new, reopened if it ended."""
        if trial_id in self.runs:
            return self.runs[trial_id]
        client, run = self.client, self.find(trial_id)
        if run is None:
            params = trial_params(parse_params(self.params), self.model, config)
            logged = stage_params(params, self.model) | {"tune.train_limit": str(self.train_limit)}
            tags = {PARENT_TAG: self.parent_run_id, ROLE_TAG: "trial", SEARCH_TAG: self.search_name}
            tags |= {TRIAL_TAG: trial_id, "model_type": self.model}
            name = f"{self.search_name}-{trial_id}"
            run = client.create_run(self.experiment_id, run_name=name, tags=tags)
            batch = [Param(k, v) for k, v in (logged | {TRIAL_TAG: trial_id}).items()]
            client.log_batch(run.info.run_id, params=batch)
        elif run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        self.runs[trial_id] = run.info.run_id
        return str(run.info.run_id)

    def finish(self, trial: TrialSummary) -> str:
        """Log the trial's epochs, end its child run as `RUN_STATUS` says (ASHA's stops too)."""
        client, run_id = self.client, self.run_id(trial.trial_id, trial.config)
        log_new_epochs(client, run_id, trial.rows)
        status = RUN_STATUS.get(trial.status, "KILLED")
        if status == "FINISHED":
            # What the run holds, not `rows`: after a hard kill, Tune's snapshot can lag epochs
            # already logged live, and the summary must agree with the curves.
            held = logged_history(client, run_id)
            tags = [
                RunTag(STOPPED_TAG, str(len(held) < self.epochs).lower()),
                RunTag("tune.epochs_trained", str(len(held))),
            ]
            client.log_batch(run_id, metrics=summary_metrics(held), tags=tags)
        elif trial.error:
            client.set_tag(run_id, FAILURE_TAG, trial.error)
        client.set_terminated(run_id, status=status)
        return run_id

    def end_search(self, status: str, failure: str | None = None) -> None:
        if failure:
            self.client.set_tag(self.parent_run_id, FAILURE_TAG, failure)
        self.client.set_terminated(self.parent_run_id, status=status)

    @contextmanager
    def _safely(self, what: str) -> Iterator[None]:
        try:
            yield
        except (MlflowException, OSError) as error:
            log.warning("MLflow: %s not recorded yet: %s", what, error)

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        log.info("trial %s started: %s", trial.trial_id, trial.config)
        with self._safely(f"trial {trial.trial_id}"):
            self.run_id(trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        self.results.setdefault(trial.trial_id, []).append(dict(result))
        rows = epoch_rows([result])
        for row in rows:
            epoch, accuracy = f"{int(row['epoch']) + 1}/{self.epochs}", row.get(MONITOR, nan)
            log.info("trial %s: epoch %s  val/accuracy %.4f", trial.trial_id, epoch, accuracy)
        with self._safely(f"trial {trial.trial_id} epoch {result.get('epoch')}"):
            log_new_epochs(self.client, self.run_id(trial.trial_id, trial.config), rows)

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, Trial.TERMINATED)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self._end(trial, Trial.ERROR)

    def _end(self, trial: Trial, status: str) -> None:
        ended = TrialSummary.of(trial, epoch_rows(self.results.get(trial.trial_id, [])), status)
        done = int(trial.last_result.get(EPOCHS_DONE, len(ended.rows)))
        if ended.error:
            log.warning("trial %s failed: %s", trial.trial_id, ended.error)
        elif done < self.epochs:
            stopped = "trial %s stopped early by ASHA after %d of %d epochs"
            log.info(stopped, trial.trial_id, done, self.epochs)
        with self._safely(f"end of trial {trial.trial_id}"):
            self.finish(ended)


def reconcile(recorder: TrialRecorder, trials: list[TrialSummary]) -> list[TrialSummary]:
    """Make each child run agree with Tune's saved state; the trials with their runs' epochs."""
    recorded = []
    for trial in trials:
        existing, status = recorder.find(trial.trial_id), RUN_STATUS.get(trial.status, "KILLED")
        if existing is None and status == "KILLED" and not trial.rows:
            recorded.append(trial)  # never started
            continue
        if existing is not None and existing.info.status == status != "KILLED":
            run_id = existing.info.run_id
            log_new_epochs(recorder.client, run_id, trial.rows)
        else:
            run_id = recorder.finish(trial)
        # The run is the record: an epoch logged live can postdate Tune's last snapshot (a hard
        # kill) or ASHA's stop (the epoch in flight completes).
        recorded.append(replace(trial, rows=logged_history(recorder.client, run_id)))
    return recorded


def restorable(
    client: MlflowClient, experiment_id: str, search_name: str, fingerprint_now: str
) -> tuple[str | None, str]:
    where = f"tags.`{ROLE_TAG}` = 'search' and tags.`{SEARCH_TAG}` = '{search_name}'"
    previous = latest_run(client, experiment_id, where)

    def mismatch(run: Run) -> str | None:
        path = run.data.tags.get(PATH_TAG)
        if run.data.tags.get(FINGERPRINT_TAG) != fingerprint_now:
            return "had another space, params or data"
        if not path or not tune.Tuner.can_restore(path):
            return f"left no Tune state to restore at {path}"
        return None

    parent_id, why = unfinished_decision(previous, "search", search_name, mismatch)
    if previous is None:
        return None, ""
    log.info("%s: %s", why, "restoring it" if parent_id else "starting a new search")
    return parent_id, previous.data.tags.get(PATH_TAG, "")


def open_search(
    uri: str, params: Params, name: ModelName, search_name: str, data_digest: str, concurrency: int
) -> TrialRecorder:
    ensure_experiment(uri, params.mlflow.experiment)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert experiment is not None
    experiment_id, space = experiment.experiment_id, params.tune.model(name)
    dumped = params.model_dump(mode="json")
    storage = check_storage(params.train.storage_path).rstrip("/")
    fingerprint_now = fingerprint(params, name, data_digest)
    parent_id, path = restorable(client, experiment_id, search_name, fingerprint_now)
    if parent_id is not None:
        ended = sum(t.ended for t in read_trials(path))
        log.info(
            "restoring unfinished search %s from %s (MLflow run %s): %d of %d trials "
            "ended, they are not rerun",
            *(search_name, path, parent_id, ended, space.num_samples),
        )
        client.update_run(parent_id, status="RUNNING")
    else:
        tags = {ROLE_TAG: "search", SEARCH_TAG: search_name, FINGERPRINT_TAG: fingerprint_now}
        tags |= {"data.digest": data_digest, "tune.search_space": json.dumps(describe_space(space))}
        tags |= {"model_type": name, "git_commit": git_commit()}
        run_name = f"{search_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        path = f"{storage}/{search_name}-{parent_id}"
        shown = {"seed": dumped["seed"], "prepare": dumped["prepare"]}
        shown["tune"] = tune_section(params, name)
        logged = flatten(shown) | {"ray.max_concurrent_trials": str(concurrency)}
        batch = [Param(k, v) for k, v in logged.items()]
        client.log_batch(parent_id, params=batch, tags=[RunTag(PATH_TAG, path)])
        scaling = params.tune.scaling
        log.info(
            "search %s: %d trials of %s, up to %d epochs each, %d at a time, %d Ray "
            "worker(s) x %d CPU(s) per trial (MLflow run %s, Tune experiment %s)",
            *(search_name, space.num_samples, name, space.epochs, concurrency),
            *(scaling.num_workers, scaling.cpus_per_worker, parent_id, path),
        )
    limit, epochs = params.tune.train_limit, space.epochs
    return TrialRecorder(
        uri, experiment_id, parent_id, search_name, name, epochs, dumped, limit, path
    )
