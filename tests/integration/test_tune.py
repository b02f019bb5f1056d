"""Hyperparameter search for real: Ray Tune trials that are Ray Train runs, on a local Ray, tracked
in a real `mlflow server`.

One small search (4 trials of at most 2 epochs on 1500 images, 2 at a time) runs through the CLI,
is killed (SIGKILL) once a trial has ended, and is run again: it must resume, not start over.
The space makes one trial clearly bad (lr 1e-6, tried third, once two good ones have reported
their first epoch), so ASHA stops it after its first epoch whatever the timing, even when its
rungs come back from a restore.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.config.params import load_params, parse_params
from pipeline.tracking.runs import FAILURE_TAG
from pipeline.tune.space import leaves, set_param_args
from pipeline.tune.trial_runs import (
    PARENT_TAG,
    ROLE_TAG,
    SEARCH_TAG,
    STOPPED_TAG,
    TRIAL_TAG,
    TrialRecorder,
    TrialSummary,
    reconcile,
)
from tests.conftest import OUTPUT_PATHS, raw_params, with_overrides

T = TypeVar("T")
SEARCH = "test-search"
EXPERIMENT = "test-tune"
EPOCHS = 2
TRIALS = 4
GOOD = {"lr": 0.003, "dropout": 0.1, "batch_size": 64, "hidden_sizes": [256]}
GOOD_TOO = {"lr": 0.01, "dropout": 0.0, "batch_size": 64, "hidden_sizes": [128]}
BAD = {"lr": 1.0e-6, "dropout": 0.0, "batch_size": 128, "hidden_sizes": [128]}
SPACE = {
    "num_samples": TRIALS,
    "epochs": EPOCHS,
    "lr": {"low": 1.0e-6, "high": 0.02},
    "dropout": {"low": 0.0, "high": 0.3},
    "batch_size": [64, 128],
    "hidden_sizes": [[128], [256]],
    "start_from": [GOOD, GOOD_TOO, BAD],
}


def search_params(data_root: Path, root: Path) -> dict[str, Any]:
    overrides = {f"paths.{k}": str(root / k) for k in OUTPUT_PATHS} | {
        "paths.raw": str(data_root / "raw"),
        "paths.prepared": str(data_root / "prepared"),
        "paths.tune": str(root / "tune"),
        "train.storage_path": str(root / "ray"),
        "mlflow.experiment": EXPERIMENT,
        "tune.train_limit": 1500,
        "tune.scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tune.max_concurrent_trials": None,  # the 2 CPUs of the local Ray: 2 at a time
        "tune.scheduler": {"grace_period": 1, "reduction_factor": 2},
        "tune.mlp": SPACE,
    }
    return with_overrides(raw_params(), overrides)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, log: Path) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(1)
    pytest.fail(f"{what} within {timeout_s:.0f} s; the search's log:\n{log.read_text()[-4000:]}")


def saved_trials(path: str) -> dict[str, tuple[str, int]] | None:
    """Tune's saved state of the experiment at `path`: trial id -> (status, results)."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(path)
        frames = analysis.trial_dataframes
    except Exception:  # not written yet, or being written
        return None
    return {t.trial_id: (t.status, len(frames.get(t.trial_id, []))) for t in analysis.trials}


def children(client: MlflowClient, parent: Run) -> list[Run]:
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
    )


def parents(client: MlflowClient) -> list[Run]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'search' and tags.`{SEARCH_TAG}` = '{SEARCH}'",
    )


@dataclass(frozen=True)
class ResumedSearch:
    root: Path
    client: MlflowClient
    before: dict[str, tuple[str, int]]  # Tune's saved state when the first driver was killed
    finished_before: dict[str, Run]  # their child runs then
    after: dict[str, tuple[str, int]]
    log: str  # the second run's output
    parent: Run
    children: list[Run]


@pytest.fixture(scope="module")
def resumed(
    data_root: Path, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> ResumedSearch:
    root = tmp_path_factory.mktemp("tune")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(search_params(data_root, root), sort_keys=False))
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own local Ray, as the CLI does
    command = [
        sys.executable, "-m", "pipeline", "tune", "--model", "mlp",
        "--params", str(params_file), "--name", SEARCH,
    ]  # fmt: skip
    client = MlflowClient(mlflow_server)

    first_log = root / "first.log"
    with first_log.open("wb") as sink:
        driver = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            path = wait_for(
                "no search started",
                lambda: next(
                    (p.data.tags.get("tune.experiment_path") for p in parents(client)), None
                ),
                120,
                first_log,
            )

            def one_ended() -> dict[str, tuple[str, int]] | None:
                state = saved_trials(path)
                ended = state and any(s == "TERMINATED" for s, _ in state.values())
                return state if ended else None

            wait_for("no trial ended", one_ended, 240, first_log)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver, its Ray and trials: all at once
            driver.wait()
    before = saved_trials(path)
    assert before is not None
    assert len(before) < TRIALS or any(s != "TERMINATED" for s, _ in before.values()), (
        "the search ended before it was killed: nothing left to resume"
    )
    [parent] = parents(client)
    finished_before = {
        run.data.tags[TRIAL_TAG]: run
        for run in children(client, parent)
        if before.get(run.data.tags[TRIAL_TAG], ("", 0))[0] == "TERMINATED"
    }

    second = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=420, start_new_session=True
    )
    output = second.stdout + second.stderr
    (root / "second.log").write_text(output)
    assert second.returncode == 0, output[-4000:]
    after = saved_trials(path)
    assert after is not None
    [parent] = parents(client)
    return ResumedSearch(
        root, client, before, finished_before, after, output, parent, children(client, parent)
    )


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_ended_trials(
    resumed: ResumedSearch,
) -> None:
    ended = {t for t, (status, _) in resumed.before.items() if status == "TERMINATED"}
    assert ended, "killed once a trial had ended"
    assert f"restoring unfinished search {SEARCH}" in resumed.log
    assert f"{len(ended)} of {TRIALS} trials ended, they are not rerun" in resumed.log

    # Tune: every trial ended; the ones ended before the kill have no new result.
    assert len(resumed.after) == TRIALS
    assert all(status == "TERMINATED" for status, _ in resumed.after.values())
    for trial in ended:
        assert resumed.after[trial] == resumed.before[trial], trial
    # MLflow: one child run per trial, the ended ones untouched.
    trial_ids = [run.data.tags[TRIAL_TAG] for run in resumed.children]
    assert sorted(trial_ids) == sorted(resumed.after)
    for trial, run in resumed.finished_before.items():
        now = resumed.client.get_run(run.info.run_id)
        assert now.info.end_time == run.info.end_time, trial
        assert now.data.metrics == run.data.metrics, trial


@pytest.mark.slow
def test_one_parent_run_with_a_child_run_per_trial(resumed: ResumedSearch) -> None:
    client, parent = resumed.client, resumed.parent
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    space = json.loads(tags["tune.search_space"])
    assert space["lr"] == {"loguniform": [1.0e-6, 0.02]}
    assert space["hidden_sizes"] == {"choice": [[128], [256]]}
    assert parent.data.params["tune.mlp.num_samples"] == str(TRIALS)
    assert parent.data.metrics["trials/total"] == TRIALS

    assert len(resumed.children) == TRIALS
    stopped = []
    for run in resumed.children:
        assert run.data.tags[PARENT_TAG] == parent.info.run_id
        assert run.info.status == "FINISHED", run.data.tags.get(FAILURE_TAG)
        params = run.data.params
        assert {"train.mlp.lr", "train.mlp.batch_size", "train.mlp.net.hidden_sizes"} <= set(params)
        assert params["train.mlp.epochs"] == str(EPOCHS)
        assert params["train.scaling.num_workers"] == "1"
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        steps = sorted(metric.step for metric in history)
        trained = int(run.data.tags["tune.epochs_trained"])
        assert steps == list(range(trained)), "one value per epoch, at step = epoch"
        for key in ("train/loss", "val/loss"):
            assert len(client.get_metric_history(run.info.run_id, key)) == trained
        assert run.data.metrics["best/val_accuracy"] == max(m.value for m in history)
        assert run.data.metrics["epochs_trained"] == trained
        if run.data.tags[STOPPED_TAG] == "true":
            assert trained < EPOCHS
            stopped.append(run)
        else:
            assert trained == EPOCHS

    # The clearly bad trial (lr 1e-6, after two good ones) is stopped after one epoch.
    bad = [run for run in resumed.children if float(run.data.params["train.mlp.lr"]) == 1.0e-6]
    assert len(bad) == 1
    assert bad[0] in stopped
    assert bad[0].data.metrics["val/accuracy"] < 0.5
    assert parent.data.metrics["trials/stopped_early"] == len(stopped)


@pytest.mark.slow
def test_the_best_configuration_is_written_as_a_params_file(resumed: ResumedSearch) -> None:
    best_file = resumed.root / "tune" / "best_mlp.yaml"
    text = best_file.read_text()
    overrides = yaml.safe_load(text)
    assert list(overrides) == ["train"]
    assert list(overrides["train"]) == ["mlp"]
    assert set(overrides["train"]["mlp"]) == {"epochs", "batch_size", "lr", "net"}
    assert set(overrides["train"]["mlp"]["net"]) == {"hidden_sizes", "dropout"}

    # Merged into the repo's params.yaml it is a valid params file.
    merged_file = resumed.root / "merged.yaml"
    merged_file.write_text(yaml.safe_dump(with_overrides(raw_params(), leaves(overrides))))
    tuned = load_params(merged_file).train.mlp
    best = max(resumed.children, key=lambda run: run.data.metrics["best/val_accuracy"])
    assert resumed.parent.data.tags["tune.best_run_id"] == best.info.run_id
    assert tuned.lr == float(best.data.params["train.mlp.lr"])
    assert tuned.batch_size == int(best.data.params["train.mlp.batch_size"])
    assert tuned.net.hidden_sizes == json.loads(best.data.params["train.mlp.net.hidden_sizes"])
    assert tuned.epochs == EPOCHS
    best_accuracy = best.data.metrics["best/val_accuracy"]
    assert resumed.parent.data.metrics["best/val_accuracy"] == pytest.approx(best_accuracy)
    summary = json.loads((resumed.root / "tune" / "best_mlp.json").read_text())
    assert summary["best_val_accuracy"] == pytest.approx(best_accuracy, abs=1e-6)
    assert summary["trials"] == TRIALS

    # The command in its header sets exactly these keys, as `dvc exp run -S` parses values.
    [command] = [line for line in text.splitlines() if "dvc exp run" in line]
    assert command.strip("# ").startswith("dvc exp run -S ")
    applied = raw_params()
    for arg in set_param_args(overrides):
        key, value = arg.split("=", 1)
        applied = with_overrides(applied, {key: yaml.safe_load(value)})
        assert f"-S {key}=" in command or f"-S '{key}=" in command
    assert applied == with_overrides(raw_params(), leaves(overrides))


def test_trial_runs_end_as_their_trials_did(mlflow_server: str) -> None:
    """Stopped by ASHA: FINISHED and tagged; failed: FAILED with the cause; cut short by an
    interruption: KILLED (and reopened when the search resumes)."""
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT) or client.get_experiment(
        client.create_experiment(EXPERIMENT)
    )
    parent = client.create_run(experiment.experiment_id, tags={ROLE_TAG: "search"})
    params = parse_params(raw_params()).model_dump(mode="json")
    recorder = TrialRecorder(
        mlflow_server,
        experiment.experiment_id,
        parent.info.run_id,
        "unit",
        "mlp",
        EPOCHS,
        params,
        None,
    )
    config = GOOD | {"hidden_sizes": json.dumps(GOOD["hidden_sizes"])}
    row = {"epoch": 0.0, "train/loss": 1.0, "val/loss": 0.9, "val/accuracy": 0.7}
    trials = [
        TrialSummary("stopped", "TERMINATED", config, [row]),
        TrialSummary("full", "TERMINATED", config, [row, row | {"epoch": 1.0}]),
        TrialSummary("failed", "ERROR", config, [row], "RuntimeError: boom"),
        TrialSummary("cut", "RUNNING", config, [row]),
        TrialSummary("never", "PENDING", config, []),
    ]
    reconcile(recorder, trials)
    reconcile(recorder, trials)  # idempotent

    runs = {run.data.tags[TRIAL_TAG]: run for run in children(client, parent)}
    assert set(runs) == {"stopped", "full", "failed", "cut"}
    assert runs["stopped"].info.status == "FINISHED"
    assert runs["stopped"].data.tags[STOPPED_TAG] == "true"
    assert runs["full"].data.tags[STOPPED_TAG] == "false"
    assert runs["failed"].info.status == "FAILED"
    assert runs["failed"].data.tags[FAILURE_TAG] == "RuntimeError: boom"
    assert runs["cut"].info.status == "KILLED"
    for run in runs.values():
        assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == len(
            next(t for t in trials if t.trial_id == run.data.tags[TRIAL_TAG]).rows
        )
