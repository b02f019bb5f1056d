"""Hyperparameter search: Ray Tune trials sampled by Optuna, stopped by ASHA, tracked in MLflow;
the best configuration as the params.yaml keys it sets, for `dvc exp run -S ...` to apply."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from mlflow.entities import Metric, RunTag
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.search.optuna import OptunaSearch

from pipeline.compat.ray import head_node
from pipeline.config.base import ModelName
from pipeline.config.env import Settings
from pipeline.config.params import Params, ParamsError
from pipeline.data.atomic import write_json, write_text
from pipeline.data.prepared import SplitArrays, open_prepared
from pipeline.tracking.runs import failure_line
from pipeline.training.driver import RUN_NAME
from pipeline.training.ray_env import preflight, ray_session, resolve_scaling
from pipeline.training.worker import MONITOR, WorkerData
from pipeline.tune.space import apply_command, overrides, trial_params, tune_space
from pipeline.tune.trial import ResumingASHA, TrialSetup, TrialSummary, read_trials, run_trial
from pipeline.tune.trial_runs import TrialRecorder, open_search, reconcile


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial ended; running the same command resumes it."""


class SearchFailed(RuntimeError):
    """No trial of the search ended with a result."""


@dataclass(frozen=True)
class SearchOutcome:
    search_name: str
    parent_run_id: str
    best_file: Path
    best_trial: str
    best_accuracy: float
    best_config: dict[str, Any]
    trials: int
    stopped_early: int
    failed: int
    epochs_trained: int
    wall_s: float
    apply_command: str


def max_concurrent_trials(params: Params, use_gpu: bool, num_samples: int) -> int:
    """Trials the cluster can run at once: its CPUs (GPUs) over what one trial's workers take."""
    resources, scaling = ray.cluster_resources(), params.tune.scaling
    fits = int(resources.get("CPU", 0.0) // (scaling.num_workers * scaling.cpus_per_worker))
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0.0) // scaling.num_workers))
    return max(1, min(fits, params.tune.max_concurrent_trials or num_samples, num_samples))


def train_subset(train: SplitArrays, limit: int | None, seed: int) -> SplitArrays:
    if limit is None:
        return train
    if limit > len(train):
        raise ParamsError(
            f"tune.train_limit: {limit} images asked, the training split has {len(train)}"
        )
    keep = np.sort(np.random.default_rng(seed).choice(len(train), size=limit, replace=False))
    return SplitArrays(train.images[keep], train.labels[keep])


def make_tuner(
    setup: TrialSetup, params: Params, search: TrialRecorder, concurrency: int
) -> tune.Tuner:
    # A trial only drives its Train run, whose workers have their own CPUs: no CPU of its own,
    # on the head node, the safe place Ray's guide recommends for drivers.
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), head_node())
    if tune.Tuner.can_restore(search.path):  # a search restored, not a new one
        return tune.Tuner.restore(search.path, trainable)  # unfinished trials rerun, errored not
    space, scheduler = params.tune.model(search.model), params.tune.scheduler.model_dump()
    storage_path, experiment_name = search.path.rsplit("/", 1)
    points = [p | {space.WIDTH_KEY: json.dumps(p[space.WIDTH_KEY])} for p in space.start_points()]
    return tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            metric=MONITOR,
            mode="max",
            search_alg=OptunaSearch(points_to_evaluate=points or None, seed=params.seed),
            scheduler=ResumingASHA(max_t=space.epochs, **scheduler),
            num_samples=space.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=False,
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            callbacks=[search],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,  # the callback logs each trial and epoch
        ),
    )


def tune_model(
    params: Params, name: ModelName, settings: Settings, search_name: str | None = None
) -> SearchOutcome:
    """Run the search `search_name` and write the best configuration; an unfinished search of
    the same name, space, params and data is restored instead (ended trials are not rerun)."""
    started = time.monotonic()
    search_name = search_name or f"tune-{name}"
    if not RUN_NAME.fullmatch(search_name):
        raise ValueError(f"search name {search_name!r}: use letters, digits, '.', '_', '-' only")
    data = open_prepared(Path(params.paths.prepared))
    uri = preflight(params, settings)
    trial_base = trial_params(params, name)
    train = train_subset(data.load("train"), params.tune.train_limit, params.seed)
    with ray_session(settings.ray_address):
        try:
            use_gpu = resolve_scaling(trial_base)
        except ParamsError as error:  # named as the section that sets it
            raise ParamsError(str(error).replace("train.scaling:", "tune.scaling:", 1)) from None
        concurrency = max_concurrent_trials(params, use_gpu, params.tune.model(name).num_samples)
        search = open_search(uri, params, name, search_name, data.digest, concurrency)
        shared = WorkerData.of(data, train).share()
        setup = TrialSetup(search.params, name, use_gpu, shared, f"{search.path}/train")
        tuner = make_tuner(setup, params, search, concurrency)
        try:
            tuner.fit()
        except (KeyboardInterrupt, SystemExit):
            search.end_search("KILLED")  # resumable
            raise
        except BaseException as error:
            search.end_search("FAILED", failure_line(error))
            raise
    trials = reconcile(search, read_trials(search.path))
    return conclude(search, params, trials, time.monotonic() - started)


def conclude(
    search: TrialRecorder, params: Params, trials: list[TrialSummary], wall_s: float
) -> SearchOutcome:
    ended = [t for t in trials if t.ended]
    num_samples = params.tune.model(search.model).num_samples
    if len(ended) < num_samples:
        search.end_search("KILLED")
        raise SearchInterrupted(
            f"search {search.search_name} interrupted: {len(ended)} of {num_samples} trials "
            "ended; run the same command again to resume it (finished trials are kept)"
        )
    finished = [t for t in ended if t.status == Trial.TERMINATED and t.rows]
    failed = [t for t in ended if t.status == Trial.ERROR]
    if not finished:
        search.end_search("FAILED", failed[0].error if failed else "no results")
        first = f" (first failure: trial {failed[0].trial_id}: {failed[0].error})" if failed else ""
        raise SearchFailed(f"search {search.search_name}: no trial produced a result{first}")
    best = max(finished, key=lambda t: t.best_accuracy)
    changes = overrides(params.tune.model(search.model), search.model, best.config)
    best_file = Path(params.paths.tune) / f"best_{search.model}.yaml"
    found = (search.search_name, search.parent_run_id, best_file, best.trial_id, best.best_accuracy)
    stopped = sum(len(t.rows) < search.epochs for t in finished)
    counts = (len(trials), stopped, len(failed), sum(len(t.rows) for t in ended))
    outcome = SearchOutcome(*found, changes, *counts, wall_s, apply_command(changes))
    header = [
        f"# Best of {len(trials)} trials of search {search.search_name} (MLflow parent run "
        f"{search.parent_run_id}),",
        f"# trial {best.trial_id}: val/accuracy {best.best_accuracy:.4f}.",
        "# Written by `mnist-pipeline tune`: the params.yaml keys the search set. To retrain,",
        "# evaluate and register with them (the champion gate decides), run:",
        f"#   {outcome.apply_command}",
    ]
    body = yaml.safe_dump(changes, sort_keys=False, default_flow_style=None)
    write_text(best_file, "\n".join(header) + "\n" + body)
    record(search, outcome, trials)
    return outcome


def record(search: TrialRecorder, outcome: SearchOutcome, trials: list[TrialSummary]) -> None:
    """The outcome in `tune/best_<model>.json` (the metrics DVC shows) and the parent run."""
    kept = ("parent_run_id", "best_trial", "trials", "stopped_early", "failed", "epochs_trained")
    summary: dict[str, Any] = {"model": search.model, "search": outcome.search_name}
    summary |= {k: getattr(outcome, k) for k in kept}
    summary["best_val_accuracy"] = round(outcome.best_accuracy, 6)
    summary["wall_s_last_session"] = round(outcome.wall_s, 1)
    write_json(outcome.best_file.with_suffix(".json"), summary)
    best_run = search.find(outcome.best_trial)
    metrics = {"best/val_accuracy": outcome.best_accuracy, "trials/total": outcome.trials}
    metrics |= {f"trials/{k}": summary[k] for k in ("stopped_early", "failed", "epochs_trained")}
    best_run_id = best_run.info.run_id if best_run else ""
    tags = {"best_trial_id": outcome.best_trial, "best_run_id": best_run_id}
    tags |= {"best_config": json.dumps(outcome.best_config, sort_keys=True)}
    tags |= {"best_params_file": str(outcome.best_file), "apply_command": outcome.apply_command}
    client, parent_id, now = search.client, search.parent_run_id, int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[RunTag(f"tune.{k}", v) for k, v in tags.items()],
    )
    client.log_artifact(parent_id, str(outcome.best_file), "tune")
    listed = [
        {k: v for k, v in asdict(t).items() if k != "rows"}
        | {"epochs": len(t.rows), "best_val_accuracy": t.best_accuracy if t.rows else None}
        for t in trials
    ]
    client.log_dict(parent_id, {"trials": listed}, "tune/trials.json")
    client.set_terminated(parent_id, status="FINISHED")
