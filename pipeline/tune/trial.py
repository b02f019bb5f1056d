"""One Tune trial: a Ray Train run reporting each epoch and the epochs done, which ASHA counts in
(Tune's `training_iteration` restarts when a restored trial resumes); an ASHA that survives a
restore, and the trials as Tune saved them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.exceptions import GetTimeoutError, RayActorError
from ray.train import CheckpointConfig, Result
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from pipeline.compat.ray import PlacementGroupStarted, head_node, replay_asha
from pipeline.config.base import ModelName
from pipeline.config.params import parse_params
from pipeline.tracking.epochs import EPOCH_METRICS
from pipeline.tracking.runs import failure_line
from pipeline.training.trainer import build_trainer
from pipeline.training.worker import MONITOR, WorkerData
from pipeline.tune.space import trial_params

log = logging.getLogger(__name__)

EPOCHS_DONE = "epochs_done"  # ASHA's time attribute: epochs trained, counted from 1


class EpochReporter(TuneReportCallback):
    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        first = metrics[0] | {EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [first], checkpoint)


@ray.remote(num_cpus=0)
class PlacementGroupReaper:
    """Removes a Train run's placement group once its controller is gone: ASHA ends it before it
    can, and Ray's own cleaner needs an auto-detected dashboard (else the next trials wait for
    CPUs forever)."""

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


class ReapPlacementGroups(PlacementGroupStarted):
    def started(self, group: PlacementGroup) -> None:
        reaper = PlacementGroupReaper.options(  # type: ignore[attr-defined]
            # Not inside the trial's placement group: that goes with the trial.
            lifetime="detached",
            resources=head_node(),
            scheduling_strategy="DEFAULT",
        ).remote()
        reaper.watch.remote(ray.get_runtime_context().current_actor, group)


@dataclass(frozen=True)
class TrialSetup:  # what every trial shares, handed over once through the object store
    params: dict[str, Any]
    model: ModelName
    use_gpu: bool
    data: ray.ObjectRef[WorkerData]
    train_storage: str


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Train run named after the trial: a restored search's trial resumes it, or only reports
    it if it had trained every epoch (ended just before the kill, unrecorded by Tune)."""
    params = trial_params(parse_params(setup.params, "params of a Tune trial"), setup.model, config)
    run_name = f"trial-{tune.get_context().get_trial_id()}"
    epochs = params.train.model(setup.model).epochs
    try:
        result = Result.from_path(f"{setup.train_storage}/{run_name}")
        metrics = dict(result.metrics or {})
        done = result.checkpoint is not None and int(metrics["epoch"]) == epochs - 1
    except Exception:  # no such run (the usual case), or no epoch saved yet: train
        done = False
    if done:
        tune.report(metrics | {EPOCHS_DONE: epochs})
        return
    callbacks = [EpochReporter(), ReapPlacementGroups()]
    keep_latest = CheckpointConfig(num_to_keep=1)  # to resume from
    storage = setup.train_storage
    build_trainer(
        params, setup.model, setup.use_gpu, setup.data, run_name, storage, keep_latest, callbacks
    ).fit()


class ResumingASHA(ASHAScheduler):
    """ASHA whose rungs survive a restore (Tune saves no scheduler state): a trial that comes
    back with results has them replayed into its bracket, in order."""

    def __init__(self, **options: Any) -> None:
        super().__init__(time_attr=EPOCHS_DONE, **options)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if EPOCHS_DONE not in (trial.last_result or {}) or not trial.path:
            return  # a new trial
        try:
            frame: Any = tune.Result.from_path(trial.path).metrics_dataframe  # None: TypeError
            points = zip(frame[EPOCHS_DONE], frame[MONITOR], strict=True)
        except Exception as error:  # no results saved: nothing to replay
            log.debug("trial %s: no results to replay (%s)", trial.trial_id, error)
            return
        # `x == x`: not NaN
        replay_asha(self, trial, [(int(d), float(v)) for d, v in points if d == d and v == v])


def epoch_rows(results: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per epoch (its latest report), sorted, with the epoch metrics only."""
    rows: dict[int, dict[str, float]] = {}
    for result in results:
        epoch = result.get("epoch")
        if epoch is None or epoch != epoch:  # missing or NaN (a row without a report)
            continue
        row = {"epoch": float(epoch)}
        row |= {k: float(result[k]) for k in EPOCH_METRICS if result.get(k) is not None}
        rows[int(epoch)] = row
    return [rows[epoch] for epoch in sorted(rows)]


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, ...
    config: dict[str, Any]
    rows: list[dict[str, float]]
    error: str | None = None

    @classmethod
    def of(cls, trial: Trial, rows: list[dict[str, float]], status: str = "") -> TrialSummary:
        status = status or trial.status
        error = failure_line(str(trial.get_error() or "")) if status == Trial.ERROR else None
        return cls(trial.trial_id, status, dict(trial.config), rows, error)

    @property
    def ended(self) -> bool:
        return self.status in (Trial.TERMINATED, Trial.ERROR)

    @property
    def best_accuracy(self) -> float:
        return max((row.get(MONITOR, float("-inf")) for row in self.rows), default=float("-inf"))


def read_trials(path: str) -> list[TrialSummary]:
    # Trials that never reported have no results file: expected, not worth Ray's warning.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        analysis = tune.ExperimentAnalysis(path)
    finally:
        quiet.setLevel(level)
    records = {t: frame.to_dict("records") for t, frame in analysis.trial_dataframes.items()}
    return [TrialSummary.of(t, epoch_rows(records.get(t.trial_id, []))) for t in analysis.trials]
