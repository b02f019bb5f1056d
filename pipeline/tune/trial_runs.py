"""MLflow: one parent run per search (`open_search` finds the unfinished one to restore, or
starts one), one child run per trial, and the Tune callback that writes the child runs live;
`reconcile` makes them agree with Tune's saved state when the search ends, so a trial is
recorded once even across interruptions.

Hand-written rather than Ray's `ray.air.integrations.mlflow.MLflowLoggerCallback`, which in Ray
2.60 (ray/air/integrations/mlflow.py:305-340) keeps its trial -> run map in memory only (a
search restored after a kill opens a second run for each trial), logs at step
`training_iteration` (which restarts when a trial resumes; the runs here log at step = epoch),
logs Tune's config (widths as JSON strings) instead of the params.yaml keys a trial trains
with, and has no notion of a parent run or a trial ASHA stopped early.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
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
    flatten,
    latest_run,
    stage_params,
    unfinished_decision,
)
from pipeline.training.worker import MONITOR
from pipeline.tune.space import describe_space, fingerprint, trial_params, tune_section
from pipeline.tune.trial import (
    EPOCHS_DONE,
    TERMINAL,
    TrialSummary,
    epoch_rows,
    read_trials,
    trial_error,
)

log = logging.getLogger(__name__)

ROLE_TAG = "tune.role"  # "search" (the parent run) or "trial" (a child run)
SEARCH_TAG = "tune.search"
TRIAL_TAG = "tune.trial_id"
FINGERPRINT_TAG = "tune.fingerprint"
PATH_TAG = "tune.experiment_path"
SPACE_TAG = "tune.search_space"
STOPPED_TAG = "tune.stopped_early"
PARENT_TAG = "mlflow.parentRunId"


def summary_metrics(rows: list[dict[str, float]], now: int) -> list[Metric]:
    """A finished trial's last and best epoch, as its child run's summary metrics."""
    if not rows:
        return []
    best = max(rows, key=lambda row: row.get(MONITOR, float("-inf")))
    last = rows[-1]
    metrics = [
        Metric(f"final/{k.replace('/', '_')}", last[k], now, 0) for k in EPOCH_METRICS if k in last
    ]
    return metrics + [
        Metric("best/val_accuracy", best.get(MONITOR, float("nan")), now, 0),
        Metric("best/epoch", best["epoch"], now, 0),
        Metric("epochs_trained", float(len(rows)), now, 0),
    ]


@dataclass
class TrialRecorder:
    """Writes the child runs of one search. Plain MLflow client calls: usable from the Tune
    callback during the search and from the reconciliation after it."""

    uri: str
    experiment_id: str
    parent_run_id: str
    search_name: str
    model: ModelName
    epochs: int
    params: dict[str, Any]  # the search's params, as a mapping
    train_limit: int | None
    _runs: dict[str, str] = field(default_factory=dict)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def find(self, trial_id: str) -> Run | None:
        where = (
            f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        )
        return latest_run(self.client, self.experiment_id, where)

    def open(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run, created with its params if new, reopened if it ended."""
        run = self.find(trial_id)
        if run is not None:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            self._runs[trial_id] = run.info.run_id
            return run.info.run_id
        params = trial_params(parse_params(self.params), self.model, config)
        logged = stage_params(params, self.model) | {
            TRIAL_TAG: trial_id,
            "tune.train_limit": str(self.train_limit),
        }
        created = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.search_name}-{trial_id}",
            tags={
                PARENT_TAG: self.parent_run_id,
                ROLE_TAG: "trial",
                TRIAL_TAG: trial_id,
                SEARCH_TAG: self.search_name,
                "model_type": self.model,
            },
        )
        run_id = str(created.info.run_id)
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])
        self._runs[trial_id] = run_id
        return run_id

    def run_id(self, trial_id: str, config: dict[str, Any]) -> str:
        return self._runs.get(trial_id) or self.open(trial_id, config)

    def log_epochs(self, run_id: str, rows: list[dict[str, float]]) -> None:
        log_new_epochs(self.client, run_id, rows)

    def finish(
        self,
        trial_id: str,
        config: dict[str, Any],
        rows: list[dict[str, float]],
        status: str,
        error: str | None = None,
    ) -> None:
        """End the child run: FINISHED (stopped early by ASHA or not), FAILED or KILLED."""
        client = self.client
        run_id = self.run_id(trial_id, config)
        self.log_epochs(run_id, rows)
        if status == "FINISHED":
            # What the run holds, not `rows`: after a hard kill, Tune's snapshot can lag epochs
            # already logged live, and the summary must agree with the curves.
            held = logged_history(client, run_id)
            tags = [
                RunTag(STOPPED_TAG, str(len(held) < self.epochs).lower()),
                RunTag("tune.epochs_trained", str(len(held))),
            ]
            metrics = summary_metrics(held, int(time.time() * 1000))
            client.log_batch(run_id, metrics=metrics, tags=tags)
        elif error:
            client.set_tag(run_id, FAILURE_TAG, error)
        client.set_terminated(run_id, status=status)


class TrialRuns(tune.Callback):
    """Tune callback (driver side): the MLflow child run of each trial, live. A failing
    MLflow call is logged and left to the reconciliation at the end of the search."""

    def __init__(self, recorder: TrialRecorder) -> None:
        self.recorder = recorder
        self.results: dict[str, list[dict[str, Any]]] = {}

    def _safely(self, what: str, action: Any) -> None:
        try:
            action()
        except (MlflowException, OSError) as error:
            log.warning("MLflow: %s not recorded yet: %s", what, error)

    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        log.info("trial %s started: %s", trial.trial_id, trial.config)
        self._safely(
            f"trial {trial.trial_id}", lambda: self.recorder.open(trial.trial_id, trial.config)
        )

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        self.results.setdefault(trial.trial_id, []).append(dict(result))
        rows = epoch_rows([result])
        if rows:
            log.info(
                "trial %s: epoch %d/%d  val/accuracy %.4f",
                trial.trial_id,
                int(rows[0]["epoch"]) + 1,
                self.recorder.epochs,
                rows[0].get(MONITOR, float("nan")),
            )
        self._safely(
            f"trial {trial.trial_id} epoch {result.get('epoch')}",
            lambda: self.recorder.log_epochs(
                self.recorder.run_id(trial.trial_id, trial.config), rows
            ),
        )

    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        rows = epoch_rows(self.results.get(trial.trial_id, []))
        done = int(trial.last_result.get(EPOCHS_DONE, len(rows)))
        if done < self.recorder.epochs:
            log.info(
                "trial %s stopped early by ASHA after %d of %d epochs",
                trial.trial_id,
                done,
                self.recorder.epochs,
            )
        self._safely(
            f"end of trial {trial.trial_id}",
            lambda: self.recorder.finish(trial.trial_id, trial.config, rows, "FINISHED"),
        )

    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        error = trial_error(trial)
        log.warning("trial %s failed: %s", trial.trial_id, error)
        rows = epoch_rows(self.results.get(trial.trial_id, []))
        self._safely(
            f"failure of trial {trial.trial_id}",
            lambda: self.recorder.finish(trial.trial_id, trial.config, rows, "FAILED", error),
        )


def _run_status(trial: TrialSummary) -> str:
    if trial.status == Trial.TERMINATED:
        return "FINISHED"
    return "FAILED" if trial.status == Trial.ERROR else "KILLED"


def reconcile(recorder: TrialRecorder, trials: list[TrialSummary]) -> list[TrialSummary]:
    """Make each child run agree with Tune's saved state: every epoch logged once, ended
    trials FINISHED (or FAILED), trials an interruption cut short KILLED (resumable).
    Returns the trials with the epochs their runs hold."""
    recorded = []
    for trial in trials:
        existing = recorder.find(trial.trial_id)
        status = _run_status(trial)
        if existing is None and status == "KILLED" and not trial.rows:
            recorded.append(trial)
            continue  # never started
        if existing is not None and existing.info.status == status and status != "KILLED":
            recorder.log_epochs(existing.info.run_id, trial.rows)
        elif status == "KILLED":
            run_id = recorder.run_id(trial.trial_id, trial.config)
            recorder.log_epochs(run_id, trial.rows)
            recorder.client.set_terminated(run_id, status="KILLED")
        else:
            recorder.finish(trial.trial_id, trial.config, trial.rows, status, trial.error)
        # The run is the record: an epoch logged live can postdate Tune's last snapshot (a
        # hard kill) or ASHA's stop (the epoch in flight completes), and the search's summary
        # must agree with the child runs.
        run = recorder.find(trial.trial_id)  # `run_id()` would reopen an ended run
        rows = logged_history(recorder.client, run.info.run_id) if run else trial.rows
        recorded.append(dataclasses.replace(trial, rows=rows))
    return recorded


def resumable_search(
    client: MlflowClient, experiment_id: str, name: str, fingerprint_now: str
) -> tuple[Run | None, str | None, str]:
    """(the latest search named `name`, the Tune experiment path to restore or None, why)."""
    where = f"tags.`{ROLE_TAG}` = 'search' and tags.`{SEARCH_TAG}` = '{name}'"
    previous = latest_run(client, experiment_id, where)

    def mismatch(run: Run) -> str | None:
        path = run.data.tags.get(PATH_TAG)
        if run.data.tags.get(FINGERPRINT_TAG) != fingerprint_now:
            return "had another space, params or data"
        if not path or not tune.Tuner.can_restore(path):
            return f"left no Tune state to restore at {path}"
        return None

    run_id, why = unfinished_decision(previous, "search", name, mismatch)
    path = previous.data.tags.get(PATH_TAG) if run_id and previous else None
    return previous, path, why


def new_parent(
    client: MlflowClient,
    experiment_id: str,
    params: Params,
    name: ModelName,
    search_name: str,
    tags: dict[str, str],
    concurrency: int,
) -> str:
    """A new search's parent run, with its space, params and `tags`."""
    run = client.create_run(
        experiment_id,
        run_name=f"{search_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags=tags
        | {
            ROLE_TAG: "search",
            SEARCH_TAG: search_name,
            SPACE_TAG: json.dumps(describe_space(params.tune.model(name))),
            "model_type": name,
            "git_commit": git_commit(),
        },
    )
    dumped = params.model_dump(mode="json")
    logged = flatten(
        {"seed": dumped["seed"], "prepare": dumped["prepare"], "tune": tune_section(params, name)}
    ) | {"ray.max_concurrent_trials": str(concurrency)}
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in logged.items()])
    return str(run.info.run_id)


@dataclass(frozen=True)
class OpenSearch:
    """The search `tune_model` runs: its parent run, Tune experiment and whether restored."""

    name: str
    parent_run_id: str
    path: str
    restored: bool


def open_search(
    client: MlflowClient,
    experiment_id: str,
    params: Params,
    name: ModelName,
    data_digest: str,
    concurrency: int,
    storage: str,
    search_name: str,
) -> OpenSearch:
    """The unfinished search of the same name, space, params and data, else a new one."""
    space = params.tune.model(name)
    fingerprint_now = fingerprint(params, name, data_digest)
    previous, restore_path, why = resumable_search(
        client, experiment_id, search_name, fingerprint_now
    )
    if previous is not None:
        log.info("%s: %s", why, "restoring it" if restore_path else "starting a new search")
    if previous is not None and restore_path:
        ended = sum(t.status in TERMINAL for t in read_trials(restore_path))
        log.info(
            "restoring unfinished search %s from %s (MLflow run %s): %d of %d trials "
            "ended, they are not rerun",
            *(search_name, restore_path, previous.info.run_id, ended, space.num_samples),
        )
        client.update_run(previous.info.run_id, status="RUNNING")
        return OpenSearch(search_name, previous.info.run_id, restore_path, restored=True)
    tags = {FINGERPRINT_TAG: fingerprint_now, "data.digest": data_digest}
    parent_id = new_parent(client, experiment_id, params, name, search_name, tags, concurrency)
    path = f"{storage.rstrip('/')}/{search_name}-{parent_id}"
    client.set_tag(parent_id, PATH_TAG, path)
    log.info(
        "search %s: %d trials of %s, up to %d epochs each, %d at a time, %d Ray "
        "worker(s) x %d CPU(s) per trial (MLflow run %s, Tune experiment %s)",
        *(search_name, space.num_samples, name, space.epochs, concurrency),
        *(params.tune.scaling.num_workers, params.tune.scaling.cpus_per_worker, parent_id, path),
    )
    return OpenSearch(search_name, parent_id, path, restored=False)
