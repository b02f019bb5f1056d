"""One Tune trial: a Ray Train run of `pipeline.training.worker.worker_loop`, built by
`pipeline.training.trainer.build_trainer` (the train stage's builder), reporting each epoch to
Tune; the scheduler that stops weak trials between epochs, the resources trials get, and the
trials as Tune saved them (`read_trials`).

Epoch reporting is Ray's own `ray.tune.integration.ray_train.TuneReportCallback` (the queue
from the Train controller to the Tune trial), extended by one key: the epochs done, counted
from 1, that ASHA counts in. Tune's `training_iteration` would not do: it counts reports of the
current Tune session, so it restarts when a restored trial resumes its Train run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from pipeline.config.params import Params, ParamsError, parse_params
from pipeline.data.prepared import SplitArrays
from pipeline.tracking.epochs import EPOCH_METRICS
from pipeline.tracking.runs import failure_line
from pipeline.training.trainer import build_trainer
from pipeline.training.worker import MONITOR, WorkerData
from pipeline.tune.space import trial_params

log = logging.getLogger(__name__)

TERMINAL = {Trial.TERMINATED, Trial.ERROR}  # the statuses of an ended trial
EPOCHS_DONE = "epochs_done"  # ASHA's time attribute: epochs trained, counted from 1


class EpochReporter(TuneReportCallback):
    """Passes each epoch the Train run reports on to Tune, with `EPOCHS_DONE`."""

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        first = dict(metrics[0])
        first[EPOCHS_DONE] = int(first["epoch"]) + 1
        super().after_report(run_context, [first], checkpoint)


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


class ReapPlacementGroups(PlacementGroupStarted):
    """Train callback: a `PlacementGroupReaper` for each worker group the controller starts."""

    def started(self, group: PlacementGroup) -> None:
        controller = ray.get_runtime_context().current_actor
        reaper = PlacementGroupReaper.options(  # type: ignore[attr-defined]
            # Not inside the trial's placement group: that goes with the trial.
            lifetime="detached",
            resources=head_node(),
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


def trainable(setup: TrialSetup) -> Any:
    """`run_trial` as Tune runs it. It only drives its Train run (the workers have their own
    CPUs): no CPU of its own, on the head node, the safe place Ray's guide recommends for
    drivers."""
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), head_node())


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
    trainer = build_trainer(
        params,
        setup.model,
        setup.use_gpu,
        setup.data,
        run_name,
        setup.train_storage,
        CheckpointConfig(num_to_keep=1),  # the latest: to resume from
        [EpochReporter(), ReapPlacementGroups()],
    )
    trainer.fit()


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
        points = zip(frame[EPOCHS_DONE], frame[MONITOR], strict=True)
        # `x == x`: not NaN
        replay_asha(self, trial, [(int(d), float(v)) for d, v in points if d == d and v == v])


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


def trial_error(trial: Trial) -> str:
    """The line that names why `trial` failed (Tune keeps its error as a text trace)."""
    return failure_line(str(trial.get_error() or ""))


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
        rows = epoch_rows([] if frame is None else frame.to_dict("records"))
        error = trial_error(trial) if trial.status == Trial.ERROR else None
        summaries.append(
            TrialSummary(trial.trial_id, trial.status, dict(trial.config), rows, error)
        )
    return summaries
