"""Hyperparameter search: Ray Tune trials, each a Ray Train run, tracked in MLflow.

`tune_model` is the driver. Each Tune trial runs `run_trial`, a function that builds and fits a
`TorchTrainer` on `pipeline.training.worker.worker_loop` (the Tune + Train V2 pattern); the
Train run
reports every epoch to Tune through `EpochReporter`, and ASHA stops weak trials between epochs.
Optuna samples the space of `params.yaml` (`tune.<model>`).

MLflow: one parent run per search, one child run per trial, written from the driver by a Tune
callback (`TrialRuns`) and reconciled with Tune's saved state when the search ends, so a trial
is recorded once even across interruptions. The best configuration is written as a params file
(`tune/best_<model>.yaml`) that `dvc exp run -S ...` applies to the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

from pipeline.config.env import Settings
from pipeline.config.params import ModelName, Params, ParamsError, SearchSpace, parse_params
from pipeline.data.atomic import write_json, write_text
from pipeline.data.prepared import SplitArrays, open_prepared
from pipeline.tracking.epochs import EPOCH_METRICS, log_new_epochs
from pipeline.tracking.runs import (
    FAILURE_TAG,
    ensure_experiment,
    ensure_reachable,
    flatten,
    git_commit,
    stage_params,
    tracking_uri,
)
from pipeline.training.driver import RUN_NAME
from pipeline.training.ray_env import check_storage, ray_session, resolve_scaling
from pipeline.training.worker import MONITOR, WorkerData, worker_loop

log = logging.getLogger(__name__)

MODE = "max"
EPOCHS_DONE = "epochs_done"  # ASHA's time attribute: epochs trained, counted from 1
ROLE_TAG = "tune.role"  # "search" (the parent run) or "trial" (a child run)
SEARCH_TAG = "tune.search"
TRIAL_TAG = "tune.trial_id"
FINGERPRINT_TAG = "tune.fingerprint"
PATH_TAG = "tune.experiment_path"
SPACE_TAG = "tune.search_space"
STOPPED_TAG = "tune.stopped_early"
PARENT_TAG = "mlflow.parentRunId"
HEAD_NODE = "node:__internal_head__"  # only the head node has it (Ray's own drivers ask so)
_UNFINISHED = {"RUNNING", "FAILED", "KILLED", "SCHEDULED"}
_TERMINAL = {Trial.TERMINATED, Trial.ERROR}


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial ended; running the same command resumes it."""


class SearchFailed(RuntimeError):
    """No trial of the search ended with a result."""


# --- the space and the params of one trial ---------------------------------------------------


def tune_space(space: SearchSpace) -> dict[str, Any]:
    """Ray Tune's search space for `space`. Widths are JSON strings: Optuna's categorical
    choices must be scalars."""
    return {
        "lr": tune.loguniform(space.lr.low, space.lr.high),
        "dropout": tune.uniform(space.dropout.low, space.dropout.high),
        "batch_size": tune.choice(list(space.batch_size)),
        space.WIDTH_KEY: tune.choice([json.dumps(width) for width in space.width()]),
    }


def start_points(space: SearchSpace) -> list[dict[str, Any]]:
    """`start_from` in the form of `tune_space`."""
    return [
        point | {space.WIDTH_KEY: json.dumps(point[space.WIDTH_KEY])}
        for point in space.start_points()
    ]


def overrides(space: SearchSpace, name: ModelName, config: dict[str, Any]) -> dict[str, Any]:
    """The params.yaml keys a trial's `config` sets (in params.yaml's structure)."""
    return {
        "train": {
            name: {
                "epochs": space.epochs,
                "batch_size": int(config["batch_size"]),
                "lr": float(config["lr"]),
                "net": {
                    space.WIDTH_KEY: json.loads(config[space.WIDTH_KEY]),
                    "dropout": float(config["dropout"]),
                },
            }
        }
    }


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with the leaves of `changes` set (nested mappings merged)."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def with_trial_scaling(params: Params) -> dict[str, Any]:
    """params as a mapping, with `train.scaling` set to the workers of one trial."""
    raw = params.model_dump(mode="json")
    scaling = params.tune.scaling
    raw["train"]["scaling"] = {
        "num_workers": scaling.num_workers,
        "cpus_per_worker": scaling.cpus_per_worker,
        "use_gpu": params.train.scaling.use_gpu,
    }
    return raw


def trial_params(params: Params, name: ModelName, config: dict[str, Any]) -> Params:
    """What one trial trains with: params, its sampled values, the trial's workers."""
    space = params.tune.model(name)
    raw = merge(with_trial_scaling(params), overrides(space, name, config))
    return parse_params(raw, f"params of a {name} trial {config}")


def fingerprint(params: Params, name: ModelName, data_digest: str) -> str:
    """What a search depends on: a search is only resumed under the same fingerprint."""
    dumped = params.model_dump(mode="json")
    fixed = {k: v for k, v in dumped["train"][name].items() if k not in ("lr", "batch_size")}
    fixed["net"] = {
        k: v for k, v in fixed["net"].items() if k not in ("dropout", "hidden_sizes", "channels")
    }
    fixed.pop("epochs")
    tune_section = {k: v for k, v in dumped["tune"].items() if k not in ("mlp", "cnn")}
    key = {
        "model": name,
        "seed": dumped["seed"],
        "train": {
            "use_gpu": dumped["train"]["scaling"]["use_gpu"],
            "max_failures": dumped["train"]["max_failures"],
            name: fixed,
        },
        "tune": tune_section | {name: dumped["tune"][name]},
        "data": data_digest,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --- inside a trial -------------------------------------------------------------------------


class EpochReporter(TuneReportCallback):
    """Passes each epoch the Train run reports on to Tune, with the epochs done (from 1) that
    ASHA counts in: unlike Tune's iteration count, it stays right when a trial resumes."""

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        first = dict(metrics[0])
        first[EPOCHS_DONE] = int(first["epoch"]) + 1
        super().after_report(run_context, [first], checkpoint)


class ResumingASHA(ASHAScheduler):
    """ASHA whose rungs survive a restore. Tune saves no scheduler state: restored, ASHA would
    compare the trials still to come with none of those already run. So each trial that comes
    back with results has them replayed into its bracket's rungs, in the order they came."""

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if EPOCHS_DONE not in (trial.last_result or {}) or not trial.path:
            return  # a new trial
        try:
            frame = tune.Result.from_path(trial.path).metrics_dataframe
        except Exception as error:  # no results saved: nothing to replay
            log.debug("trial %s: no results to replay (%s)", trial.trial_id, error)
            return
        if frame is None or EPOCHS_DONE not in frame or MONITOR not in frame:
            return
        bracket, sign = self._trial_info[trial.trial_id], self._metric_op or 1.0
        for done, value in zip(frame[EPOCHS_DONE], frame[MONITOR], strict=True):
            if done == done and value == value:  # not NaN
                bracket.on_result(trial, int(done), sign * float(value))


@ray.remote(num_cpus=0)
class PlacementGroupReaper:
    """Removes a Train run's placement group once its controller is gone.

    ASHA stops a trial by ending its Tune actor, which takes the Train controller (its child)
    down with it, before the controller can release its workers' placement group. Ray's own
    PlacementGroupCleaner then needs the dashboard's state API, reached by auto-detection: with
    no dashboard, or several Ray instances on one machine, the group stays and the next trials
    wait for CPUs forever. This actor asks the controller directly instead.
    """

    def watch(self, controller: Any, group: PlacementGroup, interval_s: float = 2.0) -> None:
        while True:
            try:
                ray.get(controller.__ray_ready__.remote(), timeout=60)
            except RayActorError:
                break
            except GetTimeoutError:  # busy, alive
                pass
            time.sleep(interval_s)
        try:
            if placement_group_table(group).get("state") != "REMOVED":
                remove_placement_group(group)
        except Exception as error:  # gone meanwhile, or Ray's cleaner was first
            log.debug("placement group %s: %s", group.id, error)
        ray.actor.exit_actor()


class ReapPlacementGroups(WorkerGroupCallback):
    """Train callback (an internal kind: Ray runs those given in RunConfig.callbacks too): a
    `PlacementGroupReaper` for each worker group the controller starts."""

    def after_worker_group_start(self, worker_group: Any) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        reaper = PlacementGroupReaper.options(  # type: ignore[attr-defined]
            # Not inside the trial's placement group: that goes with the trial.
            lifetime="detached",
            resources={HEAD_NODE: 0.001},
            scheduling_strategy="DEFAULT",
        ).remote()
        reaper.watch.remote(controller, group)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (handed over once through the object store)."""

    params: dict[str, Any]
    model: ModelName
    use_gpu: bool
    data: ray.ObjectRef[WorkerData]
    train_storage: str


def finished_train_run(path: str, epochs: int) -> dict[str, Any] | None:
    """The last metrics of a Train run at `path` that already trained all `epochs`, if so
    (its trial ended just before the search was killed, unrecorded by Tune)."""
    try:
        result = Result.from_path(path)
    except Exception:  # no such run (the usual case) or no snapshot yet: train
        return None
    metrics = dict(result.metrics or {})
    if result.checkpoint is None or int(metrics.get("epoch", -1)) != epochs - 1:
        return None
    return metrics | {EPOCHS_DONE: epochs}


def trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: a Ray Train run of `worker_loop` with the trial's values.

    The Train run is named after the trial, so a trial restarted by a restored search resumes
    its Train run from the latest checkpoint instead of starting over.
    """
    trial_id = tune.get_context().get_trial_id()
    base = parse_params(setup.params, "params (in a Tune trial)")
    params = trial_params(base, setup.model, config)
    run_name = f"trial-{trial_id}"
    epochs = params.train.model(setup.model).epochs
    done = finished_train_run(f"{setup.train_storage.rstrip('/')}/{run_name}", epochs)
    if done is not None:
        tune.report(done)
        return
    scaling = params.train.scaling
    per_worker = {"CPU": float(scaling.cpus_per_worker)} | ({"GPU": 1.0} if setup.use_gpu else {})
    trainer = TorchTrainer(
        worker_loop,  # type: ignore[arg-type]
        train_loop_config={
            "params": params.model_dump(mode="json"),
            "model": setup.model,
            "use_gpu": setup.use_gpu,
            "data": setup.data,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=setup.use_gpu,
            resources_per_worker=per_worker,
        ),
        torch_config=TorchConfig(backend="nccl" if setup.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=setup.train_storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest: to resume from
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            # Train callbacks only; Tune's own callbacks go in tune.RunConfig.
            callbacks=[EpochReporter(), ReapPlacementGroups()],  # type: ignore[list-item]
        ),
    )
    trainer.fit()


# --- MLflow: the parent run and one child run per trial --------------------------------------


def epoch_rows(results: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per epoch (the latest report of it), sorted, with the epoch metrics only."""
    rows: dict[int, dict[str, float]] = {}
    for result in results:
        epoch = result.get("epoch")
        if epoch is None or epoch != epoch:  # missing or NaN (a row without a report)
            continue
        row = {"epoch": float(epoch)}
        row |= {k: float(result[k]) for k in EPOCH_METRICS if result.get(k) is not None}
        rows[int(epoch)] = row
    return [rows[epoch] for epoch in sorted(rows)]


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
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and "
                f"tags.`{TRIAL_TAG}` = '{trial_id}'"
            ),
            max_results=1,
        )
        return runs[0] if runs else None

    def open(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run, created with its params if new, reopened if it ended."""
        client = self.client
        run = self.find(trial_id)
        if run is None:
            params = trial_params(parse_params(self.params), self.model, config)
            logged = stage_params(params, self.model) | {
                TRIAL_TAG: trial_id,
                "tune.train_limit": str(self.train_limit),
            }
            created = client.create_run(
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
            run_id = created.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])
        else:
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
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
        tags = []
        if status == "FINISHED":
            # What the run holds, not `rows`: after a hard kill, Tune's snapshot can lag epochs
            # already logged live, and the summary must agree with the curves.
            rows = logged_epochs(client, run_id)
            trained = len(rows)
            stopped = trained < self.epochs
            tags = [
                RunTag(STOPPED_TAG, str(stopped).lower()),
                RunTag("tune.epochs_trained", str(trained)),
            ]
            metrics: list[Metric] = []
            if rows:
                now = int(time.time() * 1000)
                best = max(rows, key=lambda row: row.get(MONITOR, float("-inf")))
                last = rows[-1]
                metrics = [
                    Metric(f"final/{k.replace('/', '_')}", last[k], now, 0)
                    for k in EPOCH_METRICS
                    if k in last
                ]
                metrics += [
                    Metric("best/val_accuracy", best.get(MONITOR, float("nan")), now, 0),
                    Metric("best/epoch", best["epoch"], now, 0),
                    Metric("epochs_trained", float(trained), now, 0),
                ]
            client.log_batch(run_id, metrics=metrics, tags=tags)
        elif error:
            client.set_tag(run_id, FAILURE_TAG, error)
        client.set_terminated(run_id, status=status)


def logged_epochs(client: MlflowClient, run_id: str) -> list[dict[str, float]]:
    """The run's per-epoch metrics as rows (`epoch` = step), in epoch order."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for metric in client.get_metric_history(run_id, key):
            by_epoch.setdefault(metric.step, {"epoch": float(metric.step)})[key] = metric.value
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _first_line(error: BaseException | str | None) -> str:
    text = str(error or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray wraps the cause: its last line names the exception that ended the trial.
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= 300 else line[:297] + "..."


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
        error = _first_line(trial.get_error())
        log.warning("trial %s failed: %s", trial.trial_id, error)
        rows = epoch_rows(self.results.get(trial.trial_id, []))
        self._safely(
            f"failure of trial {trial.trial_id}",
            lambda: self.recorder.finish(trial.trial_id, trial.config, rows, "FAILED", error),
        )


# --- the search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, ...
    config: dict[str, Any]
    rows: list[dict[str, float]]
    error: str | None = None

    @property
    def best_accuracy(self) -> float:
        return max((row.get(MONITOR, float("-inf")) for row in self.rows), default=float("-inf"))

    @property
    def epochs(self) -> int:
        return len(self.rows)


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


def read_trials(path: str) -> list[TrialSummary]:
    """Every trial of the Tune experiment at `path`, as last saved."""
    # Trials that never reported have no results file: expected, not worth Ray's warning.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        analysis = tune.ExperimentAnalysis(path)
    finally:
        quiet.setLevel(level)
    frames = analysis.trial_dataframes
    summaries = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        results = [] if frame is None else frame.to_dict("records")
        error = _first_line(trial.get_error()) if trial.status == Trial.ERROR else None
        summaries.append(
            TrialSummary(
                trial.trial_id, trial.status, dict(trial.config), epoch_rows(results), error
            )
        )
    return summaries


def reconcile(
    recorder: TrialRecorder, trials: list[TrialSummary], epochs: int
) -> list[TrialSummary]:
    """Make each child run agree with Tune's saved state: every epoch logged once, ended
    trials FINISHED (or FAILED), trials an interruption cut short KILLED (resumable).
    Returns the trials with the epochs their runs hold."""
    recorded = []
    for trial in trials:
        existing = recorder.find(trial.trial_id)
        if trial.status == Trial.TERMINATED:
            status = "FINISHED"
        elif trial.status == Trial.ERROR:
            status = "FAILED"
        else:
            status = "KILLED"
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
        rows = logged_epochs(recorder.client, run.info.run_id) if run else trial.rows
        recorded.append(dataclasses.replace(trial, rows=rows))
    return recorded


def max_concurrent_trials(params: Params, use_gpu: bool, num_samples: int) -> int:
    """Trials the cluster can run at once: its CPUs (GPUs) over what one trial's workers take."""
    resources = ray.cluster_resources()
    scaling = params.tune.scaling
    fits = int(resources.get("CPU", 0.0) // (scaling.num_workers * scaling.cpus_per_worker))
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0.0) // scaling.num_workers))
    if params.tune.max_concurrent_trials is not None:
        fits = min(fits, params.tune.max_concurrent_trials)
    return max(1, min(fits, num_samples))


def train_subset(train: SplitArrays, limit: int | None, seed: int) -> SplitArrays:
    """`limit` training images drawn with `seed` (all of them when `limit` is None)."""
    if limit is None:
        return train
    if limit > len(train):
        raise ParamsError(
            f"tune.train_limit: {limit} images asked, the training split has {len(train)}"
        )
    keep = np.sort(np.random.default_rng(seed).choice(len(train), size=limit, replace=False))
    return SplitArrays(train.images[keep], train.labels[keep])


def previous_search(client: MlflowClient, experiment_id: str, name: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'search' and tags.`{SEARCH_TAG}` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def resumable(previous: Run | None, fingerprint_now: str) -> tuple[str | None, str]:
    """(the Tune experiment path to restore or None, why)."""
    if previous is None:
        return None, "no earlier search of that name"
    label = f"search {previous.data.tags.get(SEARCH_TAG)} (MLflow run {previous.info.run_id})"
    path = previous.data.tags.get(PATH_TAG)
    if previous.info.status not in _UNFINISHED:
        return None, f"{label} is {previous.info.status}: a finished search is not resumed"
    if previous.data.tags.get(FINGERPRINT_TAG) != fingerprint_now:
        return None, f"{label} is unfinished but had another space, params or data"
    if not path or not tune.Tuner.can_restore(path):
        return None, f"{label} is unfinished but left no Tune state to restore at {path}"
    return path, f"{label} is unfinished ({previous.info.status})"


def search_params(params: Params, name: ModelName, concurrency: int) -> dict[str, str]:
    dumped = params.model_dump(mode="json")
    tune_section = {k: v for k, v in dumped["tune"].items() if k not in ("mlp", "cnn")}
    return flatten(
        {
            "seed": dumped["seed"],
            "prepare": dumped["prepare"],
            "tune": tune_section | {name: dumped["tune"][name]},
        }
    ) | {"ray.max_concurrent_trials": str(concurrency)}


def set_param_args(changes: dict[str, Any], prefix: str = "") -> list[str]:
    """`dvc exp run -S` arguments that set `changes` (leaves only; lists without spaces)."""
    args = []
    for key, value in changes.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            args += set_param_args(value, f"{path}.")
        elif isinstance(value, list):
            args.append(f"{path}={json.dumps(value, separators=(',', ':'))}")
        else:  # repr: a float keeps every digit and stays a float (`1e-05`, `0.0031`)
            args.append(f"{path}={value!r}")
    return args


def apply_command(changes: dict[str, Any]) -> str:
    """The shell command that retrains with `changes`, then evaluates and registers."""
    return "dvc exp run " + " ".join(f"-S {shlex.quote(arg)}" for arg in set_param_args(changes))


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


def _new_parent(
    client: MlflowClient,
    experiment_id: str,
    name: ModelName,
    search_name: str,
    params: Params,
    concurrency: int,
    data_digest: str,
    fingerprint_now: str,
) -> str:
    space = params.tune.model(name)
    described = {
        "lr": {"loguniform": [space.lr.low, space.lr.high]},
        "dropout": {"uniform": [space.dropout.low, space.dropout.high]},
        "batch_size": {"choice": space.batch_size},
        space.WIDTH_KEY: {"choice": space.width()},
        "epochs": {"max": space.epochs},
    }
    run = client.create_run(
        experiment_id,
        run_name=f"{search_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            ROLE_TAG: "search",
            SEARCH_TAG: search_name,
            FINGERPRINT_TAG: fingerprint_now,
            SPACE_TAG: json.dumps(described),
            "model_type": name,
            "git_commit": git_commit(),
            "data.digest": data_digest,
        },
    )
    logged = search_params(params, name, concurrency)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in logged.items()])
    return str(run.info.run_id)


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
    experiment_id = experiment.experiment_id
    fingerprint_now = fingerprint(params, name, data.digest)
    trial_base = parse_params(with_trial_scaling(params), "params with tune.scaling")
    train = train_subset(data.load("train"), params.tune.train_limit, params.seed)
    with ray_session(settings.ray_address):
        try:
            use_gpu = resolve_scaling(trial_base)
        except ParamsError as error:
            raise ParamsError(str(error).replace("train.scaling:", "tune.scaling:", 1)) from None
        storage = check_storage(params.train.storage_path)
        concurrency = max_concurrent_trials(params, use_gpu, space.num_samples)

        previous = previous_search(client, experiment_id, search_name)
        restore_path, why = resumable(previous, fingerprint_now)
        if previous is not None:
            log.info("%s: %s", why, "restoring it" if restore_path else "starting a new search")
        if restore_path and previous is not None:
            parent_id = previous.info.run_id
            path = restore_path
            before = read_trials(path)
            ended = sum(t.status in _TERMINAL for t in before)
            log.info(
                "restoring unfinished search %s from %s (MLflow run %s): %d of %d trials "
                "ended, they are not rerun",
                search_name,
                path,
                parent_id,
                ended,
                space.num_samples,
            )
            client.update_run(parent_id, status="RUNNING")
        else:
            parent_id = _new_parent(
                client,
                experiment_id,
                name,
                search_name,
                params,
                concurrency,
                data.digest,
                fingerprint_now,
            )
            path = f"{storage.rstrip('/')}/{search_name}-{parent_id}"
            client.set_tag(parent_id, PATH_TAG, path)
            log.info(
                "search %s: %d trials of %s, up to %d epochs each, %d at a time, %d Ray "
                "worker(s) x %d CPU(s) per trial (MLflow run %s, Tune experiment %s)",
                search_name,
                space.num_samples,
                name,
                space.epochs,
                concurrency,
                params.tune.scaling.num_workers,
                params.tune.scaling.cpus_per_worker,
                parent_id,
                path,
            )
        storage_path, experiment_name = path.rsplit("/", 1)
        setup = TrialSetup(
            params=params.model_dump(mode="json"),
            model=name,
            use_gpu=use_gpu,
            data=WorkerData.of(data, train).share(),
            train_storage=f"{path}/train",
        )
        # The trial function only drives its Train run (the workers have their own CPUs): no
        # CPU of its own, on the head node, the safe place Ray's guide recommends for drivers.
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, setup=setup), {HEAD_NODE: 0.001}
        )
        recorder = TrialRecorder(
            uri,
            experiment_id,
            parent_id,
            search_name,
            name,
            space.epochs,
            params.model_dump(mode="json"),
            params.tune.train_limit,
        )
        try:
            if restore_path:
                tuner = tune.Tuner.restore(
                    path, trainable, resume_unfinished=True, resume_errored=False
                )
            else:
                tuner = tune.Tuner(
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
                        callbacks=[TrialRuns(recorder)],
                        failure_config=tune.FailureConfig(max_failures=0),
                        verbose=0,  # the callback logs each trial and epoch
                    ),
                )
            tuner.fit()
        except (KeyboardInterrupt, SystemExit):
            client.set_terminated(parent_id, status="KILLED")
            raise
        except BaseException as error:
            client.set_tag(parent_id, FAILURE_TAG, _first_line(f"{type(error).__name__}: {error}"))
            client.set_terminated(parent_id, status="FAILED")
            raise
    trials = read_trials(path)
    trials = reconcile(recorder, trials, space.epochs)
    return _conclude(
        client, recorder, params, name, search_name, path, trials, bool(restore_path), started
    )


def _conclude(
    client: MlflowClient,
    recorder: TrialRecorder,
    params: Params,
    name: ModelName,
    search_name: str,
    path: str,
    trials: list[TrialSummary],
    restored: bool,
    started: float,
) -> SearchOutcome:
    space = params.tune.model(name)
    parent_id = recorder.parent_run_id
    ended = [t for t in trials if t.status in _TERMINAL]
    if len(ended) < space.num_samples:
        client.set_terminated(parent_id, status="KILLED")
        raise SearchInterrupted(
            f"search {search_name} interrupted: {len(ended)} of {space.num_samples} trials "
            "ended; run the same command again to resume it (finished trials are kept)"
        )
    finished = [t for t in ended if t.status == Trial.TERMINATED and t.rows]
    failed = [t for t in ended if t.status == Trial.ERROR]
    if not finished:
        client.set_tag(parent_id, FAILURE_TAG, failed[0].error if failed else "no results")
        client.set_terminated(parent_id, status="FAILED")
        raise SearchFailed(
            f"search {search_name}: no trial produced a result"
            + (f" (first failure: trial {failed[0].trial_id}: {failed[0].error})" if failed else "")
        )
    best = max(finished, key=lambda t: t.best_accuracy)
    stopped = [t for t in finished if t.epochs < space.epochs]
    changes = overrides(space, name, best.config)
    best_file = Path(params.paths.tune) / f"best_{name}.yaml"
    write_text(best_file, best_file_text(changes, search_name, parent_id, best, len(trials)))
    wall_s = time.monotonic() - started
    epochs_trained = sum(t.epochs for t in ended)
    summary: dict[str, Any] = {
        "model": name,
        "search": search_name,
        "parent_run_id": parent_id,
        "best_trial": best.trial_id,
        "best_val_accuracy": round(best.best_accuracy, 6),
        "trials": len(trials),
        "stopped_early": len(stopped),
        "failed": len(failed),
        "epochs_trained": epochs_trained,
        "wall_s_last_session": round(wall_s, 1),
    }
    write_json(best_file.with_suffix(".json"), summary)
    best_child = recorder.find(best.trial_id)
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[
            Metric("best/val_accuracy", best.best_accuracy, now, 0),
            Metric("trials/total", float(len(trials)), now, 0),
            Metric("trials/stopped_early", float(len(stopped)), now, 0),
            Metric("trials/failed", float(len(failed)), now, 0),
            Metric("trials/epochs_trained", float(epochs_trained), now, 0),
        ],
        tags=[
            RunTag("tune.best_trial_id", best.trial_id),
            RunTag("tune.best_run_id", best_child.info.run_id if best_child else ""),
            RunTag("tune.best_config", json.dumps(changes, sort_keys=True)),
            RunTag("tune.best_params_file", str(best_file)),
            RunTag("tune.apply_command", apply_command(changes)),
        ],
    )
    client.log_artifact(parent_id, str(best_file), "tune")
    client.log_dict(
        parent_id,
        {
            "trials": [
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
        },
        "tune/trials.json",
    )
    client.set_terminated(parent_id, status="FINISHED")
    return SearchOutcome(
        search_name=search_name,
        parent_run_id=parent_id,
        experiment_path=path,
        best_file=best_file,
        best_trial=best.trial_id,
        best_accuracy=best.best_accuracy,
        best_config=changes,
        trials=len(trials),
        stopped_early=len(stopped),
        failed=len(failed),
        restored=restored,
        wall_s=wall_s,
        apply_command=apply_command(changes),
    )
