"""Fault tolerance, for real: a Ray Train worker killed mid-epoch, a budget of no restarts, an
interrupted `dvc repro`. Real Ray, a real `mlflow server`. (A driver killed and run again:
tests/integration/test_stack.py, with its checkpoints in the object store.)

Epochs are counted from 0, as MLflow steps and `history.csv` count them. Run with `-s` to see
the measured cost of a worker failure.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline.config.env import Settings
from pipeline.config.params import Params, parse_params
from pipeline.data import prepare
from pipeline.models.artifact import load_model
from pipeline.tracking.epochs import EPOCH_METRICS, RESTARTS_TAG
from pipeline.tracking.runs import DESCRIPTION_TAG, FAILURE_TAG, RESUMES_TAG, RUN_NAME_PARAM
from pipeline.training.driver import TrainOutcome, train_model
from tests.conftest import OUTPUT_PATHS, SMALL, copy_repo, raw_params, with_overrides

EPOCHS = 4
KILL_EPOCH = 2  # killed once epochs 0 and 1 are committed, while epoch 2 runs
ALL_EPOCHS = list(range(EPOCHS))
EXPERIMENT = "fault-tolerance"
# More training images than SMALL: an epoch lasts seconds, so a kill lands inside one.
PROFILE = SMALL | {
    "prepare.train_limit": 12_500,
    "prepare.val_size": 1000,
    "train.mlp.epochs": EPOCHS,
    "mlflow.experiment": EXPERIMENT,
}


def profile(out: Path, prepared: Path, **overrides: Any) -> dict[str, Any]:
    """The repo's params on PROFILE: data from `prepared`, outputs and Ray storage in `out`."""
    paths = {f"paths.{k}": str(out / k) for k in OUTPUT_PATHS}
    paths |= {"paths.prepared": str(prepared), "train.storage_path": str(out / "ray")}
    return with_overrides(raw_params(), PROFILE | paths | overrides)


@pytest.fixture(scope="module")
def prepared(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PROFILE's split of the raw files the session already fetched."""
    folder = tmp_path_factory.mktemp("ft-data") / "prepared"
    raw = profile(folder.parent, folder, **{"paths.raw": str(data_root / "raw")})
    prepare.run(parse_params(raw, "fault-tolerance params"))
    return folder


# --- watching runs and workers from outside ------------------------------------------------


def the_run(client: MlflowClient, run_name: str) -> Run | None:
    """The one MLflow run trained under `run_name`, once it exists."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"params.`{RUN_NAME_PARAM}` = '{run_name}'"
    )
    assert len(runs) <= 1, f"more than one MLflow run named {run_name}"
    return runs[0] if runs else None


def epoch_steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Every step logged for each per-epoch metric, duplicates kept."""
    return {
        key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in EPOCH_METRICS
    }


def committed(client: MlflowClient, run_name: str) -> set[int]:
    """The epochs logged so far: the controller logs one once Ray committed its checkpoint."""
    run = the_run(client, run_name)
    return set(epoch_steps(client, run.info.run_id)["val/accuracy"]) if run else set()


def logged_at(client: MlflowClient, run_id: str) -> dict[int, float]:
    """When each epoch was logged (epoch seconds)."""
    return {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, "val/accuracy")}


def train_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray Train workers below `root` (Ray titles each worker process after its actor)."""
    try:
        below = root.children(recursive=True)
    except psutil.NoSuchProcess:  # the driver exited
        return []
    found = []
    for process in below:
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # exited meanwhile
            continue
    return found


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s} s")
        time.sleep(0.1)


@dataclass
class Kill:
    """What the killer saw: when, which process, the epochs committed at that moment."""

    at: float = 0.0
    pid: int = 0
    committed: set[int] = field(default_factory=set)
    workers_back_at: float | None = None  # when a new worker group was up


def kill_a_worker(
    client: MlflowClient, run_name: str, root: psutil.Process, kill: Kill, restart: bool
) -> None:
    """Once the epochs before KILL_EPOCH are committed, SIGKILL one Ray Train worker; then,
    if Ray is to `restart` the workers, note when a new worker group is up."""
    wait_for(lambda: committed(client, run_name) >= set(range(KILL_EPOCH)), 300, "epoch 1")
    before = train_workers(root)
    os.kill(before[-1].pid, signal.SIGKILL)
    kill.at, kill.pid = time.time(), before[-1].pid
    kill.committed = committed(client, run_name)
    if restart:
        old = {process.pid for process in before}
        wait_for(lambda: len({p.pid for p in train_workers(root)} - old) >= 2, 120, "a restart")
        kill.workers_back_at = time.time()


@contextmanager
def killer(
    client: MlflowClient, run_name: str, root: psutil.Process, restart: bool
) -> Iterator[Kill]:
    """Run `kill_a_worker` beside the block (which trains); re-raise what it raised."""
    kill, errors = Kill(), []

    def target() -> None:
        try:
            kill_a_worker(client, run_name, root, kill, restart)
        except Exception as error:  # reported in the test's thread below
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield kill
    thread.join(timeout=150)
    if errors:
        raise errors[0]


def cli_train(params_file: Path, run_name: str) -> list[str]:
    """The train stage's command, as a person (or `submit`) runs it."""
    return [
        sys.executable, "-m", "pipeline", "train", "--model", "mlp",
        "--params", str(params_file), "--run-name", run_name,
    ]  # fmt: skip


def driver_env(tracking: str) -> dict[str, str]:
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking}
    env.pop("RAY_ADDRESS", None)  # a local Ray of the driver's own, as a stage starts
    return env


def write_params(folder: Path, raw: dict[str, Any]) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def history_epochs(plots: Path) -> list[int]:
    with (plots / "mlp" / "history.csv").open() as stream:
        return [int(row["epoch"]) for row in csv.DictReader(stream)]


# --- a worker dies -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run the others are measured against."""

    params: Params
    outcome: TrainOutcome
    wall_s: float


@pytest.fixture(scope="module")
def reference(
    prepared: Path,
    mlflow_server: str,
    local_ray: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Reference:
    out = tmp_path_factory.mktemp("ft-reference")
    params = parse_params(profile(out, prepared), "reference params")
    started = time.monotonic()
    outcome = train_model(
        params, "mlp", Settings(mlflow_tracking_uri=mlflow_server), run_name="ft-reference"
    )
    return Reference(params, outcome, time.monotonic() - started)


@pytest.mark.slow
def test_a_finished_run_is_trained_anew_not_resumed(
    reference: Reference, mlflow_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    again = train_model(
        reference.params, "mlp", Settings(mlflow_tracking_uri=mlflow_server), "ft-reference"
    )
    assert "is FINISHED: a finished run is never resumed" in caplog.text
    assert again.spec.run_id != reference.outcome.spec.run_id
    # From epoch 0, in a Ray folder of its own: the same seed gives the same curves.
    assert Path(again.run_path).name == f"ft-reference-{again.spec.run_id}"
    assert again.runtime  # empty had the workers resumed a finished fit and trained nothing
    for row, expected in zip(again.history, reference.outcome.history, strict=True):
        assert row == pytest.approx(expected)


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint_in_the_same_run(
    prepared: Path,
    mlflow_server: str,
    local_ray: None,
    reference: Reference,
    tmp_path: Path,
) -> None:
    params = parse_params(profile(tmp_path, prepared, **{"train.max_failures": 1}), "params")
    client = MlflowClient(mlflow_server)
    started = time.monotonic()
    with killer(client, "ft-restart", psutil.Process(), restart=True) as kill:
        outcome = train_model(
            params, "mlp", Settings(mlflow_tracking_uri=mlflow_server), run_name="ft-restart"
        )
    wall = time.monotonic() - started
    assert kill.committed == set(range(KILL_EPOCH)), "the kill must land inside epoch 2"

    # One run, continued: same id, one restart, each epoch once in MLflow and in the history.
    run = the_run(client, "ft-restart")
    assert run is not None
    assert run.info.run_id == outcome.spec.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags[RESTARTS_TAG] == "1"
    assert run.data.tags[RESUMES_TAG] == "0"
    assert epoch_steps(client, run.info.run_id) == {key: ALL_EPOCHS for key in EPOCH_METRICS}
    assert [int(row["epoch"]) for row in outcome.history] == ALL_EPOCHS
    assert history_epochs(Path(params.paths.plots)) == ALL_EPOCHS
    for row in outcome.history:  # each resumed epoch still saw the whole split, once
        assert row["train/samples"] == 11_500

    # The resumed run ends where the uninterrupted one did.
    expected, reference_wall = reference.outcome, reference.wall_s
    difference = outcome.history[-1]["val/accuracy"] - expected.history[-1]["val/accuracy"]
    assert abs(difference) <= 0.005

    # Time lost: how much later the interrupted epoch was committed than one epoch after the
    # previous commit, as in the uninterrupted run.
    times = logged_at(client, run.info.run_id)
    expected_times = logged_at(client, expected.spec.run_id)
    epoch_s = expected_times[KILL_EPOCH] - expected_times[KILL_EPOCH - 1]
    lost = times[KILL_EPOCH] - times[KILL_EPOCH - 1] - epoch_s
    assert kill.workers_back_at is not None
    print(
        f"\nworker pid {kill.pid} killed {kill.at - times[KILL_EPOCH - 1]:.1f} s into epoch "
        f"{KILL_EPOCH} (an epoch takes {epoch_s:.1f} s uninterrupted)"
        f"\nkill -> new worker group up: {kill.workers_back_at - kill.at:.1f} s"
        f"\nkill -> epoch {KILL_EPOCH} committed again: {times[KILL_EPOCH] - kill.at:.1f} s"
        f"\nkill -> training resumed (that minus one epoch): "
        f"{times[KILL_EPOCH] - kill.at - epoch_s:.1f} s"
        f"\ntime lost to the failure: {lost:.1f} s; whole run {wall:.1f} s vs {reference_wall:.1f}"
        f" s uninterrupted"
        f"\nfinal val/accuracy {outcome.history[-1]['val/accuracy']:.4f} vs "
        f"{expected.history[-1]['val/accuracy']:.4f} uninterrupted: "
        f"{difference * 100:+.2f} pp; final val/loss {outcome.history[-1]['val/loss']:.6f} vs "
        f"{expected.history[-1]['val/loss']:.6f}"
    )


@pytest.mark.slow
def test_worker_failure_beyond_the_budget_fails_clearly_and_leaves_nothing(
    prepared: Path, mlflow_server: str, tmp_path: Path
) -> None:
    params_file = write_params(tmp_path, profile(tmp_path, prepared, **{"train.max_failures": 0}))
    client = MlflowClient(mlflow_server)
    log = tmp_path / "driver.log"
    with log.open("wb") as sink:
        driver = subprocess.Popen(
            cli_train(params_file, "ft-budget"),
            env=driver_env(mlflow_server),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            with killer(client, "ft-budget", psutil.Process(driver.pid), restart=False) as kill:
                driver.wait(timeout=420)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    output = log.read_text()
    assert driver.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    print(f"\n{errors[0]}")
    assert re.fullmatch(
        r"error: training mlp failed in epoch 2 \(of 0-3\), beyond train\.max_failures=0: "
        r"worker rank [01]: ActorDiedError: The actor died unexpectedly.*",
        errors[0],
    )
    assert len(errors[0]) < 600  # short: one line per failed rank, no tracebacks
    assert kill.committed == set(range(KILL_EPOCH))

    run = the_run(client, "ft-budget")
    assert run is not None
    assert run.info.status == "FAILED"
    assert errors[0].removeprefix("error: ") == run.data.tags[FAILURE_TAG]
    assert run.data.tags[DESCRIPTION_TAG] == f"failed: {run.data.tags[FAILURE_TAG]}"
    assert run.data.tags[RESTARTS_TAG] == "0"
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "plots").exists()
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []


# --- dvc repro is interrupted --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_dvc_repro_then_repro_finishes(
    signum: signal.Signals, tmp_path: Path, mirror: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(with_overrides(raw_params(), PROFILE)))
    env = os.environ | {
        "MNIST_MIRROR": str(mirror),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for unset in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(unset, None)
    repro = [sys.executable, "-m", "dvc", "repro", "train@mlp"]

    # To the whole process group, as a terminal sends Ctrl-C: dvc, the stage, its Ray.
    with (tmp_path / "first.log").open("wb") as sink:
        first = subprocess.Popen(
            repro, cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            # Two checkpoint folders: epoch 0's is committed, epoch 1's on its way.
            wait_for(
                lambda: len(list((repo / ".ray_results").glob("*/checkpoint_*"))) >= 2,
                300,
                "two checkpoints",
            )
            workers = train_workers(psutil.Process(first.pid))
            os.killpg(first.pid, signum)
            first.wait(timeout=120)  # reaped: dvc's lock names a pid that must be gone
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"Ray workers outlived the interrupted stage: {alive}"
    assert first.returncode != 0
    # Nothing half-written: no model, no curves, no staging folders of atomic writes.
    assert not (repo / "models" / "mlp").exists()
    assert not (repo / "plots" / "mlp" / "history.csv").exists()
    assert [p for p in repo.rglob(".*.tmp-*") if ".dvc" not in p.parts] == []

    second = subprocess.run(repro, cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage 'train@mlp'" in second.stdout
    for stage in ("fetch", "prepare"):
        assert f"Running stage '{stage}'" not in second.stdout
    assert "resuming run mlp (MLflow run" in second.stdout + second.stderr
    net, spec = load_model(repo / "models" / "mlp")
    assert spec.epoch in ALL_EPOCHS
    assert history_epochs(repo / "plots") == ALL_EPOCHS
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run = the_run(client, "mlp")
    assert run is not None
    assert run.info.status == "FINISHED"
    assert epoch_steps(client, run.info.run_id) == {key: ALL_EPOCHS for key in EPOCH_METRICS}
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "train@mlp"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "up to date" in status.stdout


# --- the pieces, without Ray ---------------------------------------------------------------
