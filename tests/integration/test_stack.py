"""The deployed stack for real (PostgreSQL, SeaweedFS's S3, MLflow with basic auth, started by
the entrypoints Compose runs): bad credentials and set-up are refused before any work, a
training tracks and checkpoints into it and survives its servers' faults, DVC pushes to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml

from pipeline.models.artifact import load_model
from pipeline.tracking.runs import RESUMES_TAG, RUN_NAME_PARAM
from pipeline.training.ray_env import LOCAL_RAY_TRAIN_ENV, TRAINING_ENV
from testkit.cluster import ray_cluster
from testkit.processes import clean_env, free_port
from testkit.stack import Stack
from tests.conftest import SMALL, Registry, raw_params, register_model, with_overrides
from tests.integration.test_fault_tolerance import history_epochs, train_workers


def _params_file(folder: Path, data_root: Path, **overrides: object) -> Path:
    """SMALL params reading the shared prepared data, writing under `folder`."""
    paths = {f"paths.{k}": str(folder / k) for k in ("models", "metrics", "plots", "reports")}
    values = (
        SMALL
        | paths
        | {
            "paths.raw": str(data_root / "raw"),
            "paths.prepared": str(data_root / "prepared"),
            "train.storage_path": "s3://mnist-dvc/ray",
        }
        | overrides
    )
    target = folder / "params.yaml"
    target.write_text(yaml.safe_dump(with_overrides(raw_params(), values), sort_keys=False))
    return target


def _train(params: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline", "train", "-m", "mlp", "--params", str(params)]
    return subprocess.run(
        [*command, *args], env=clean_env(**env), capture_output=True, text=True, timeout=600
    )


def _runs(stack: Stack) -> list[Any]:
    with stack.mlflow.client() as client:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return list(client.search_runs(experiments)) if experiments else []


BAD_SETUPS = {
    "wrong MLflow password": (
        lambda s: s.env() | {"MLFLOW_TRACKING_PASSWORD": "not-the-password"},
        {},
        "refused user 'trainer'",
    ),
    "no S3 keys": (
        lambda s: (
            {k: v for k, v in s.env().items() if not k.startswith("AWS_SECRET")}
            | {"AWS_ACCESS_KEY_ID": ""}
        ),
        {},
        "no S3 credentials",
    ),
    "wrong S3 secret": (
        lambda s: s.env() | {"AWS_SECRET_ACCESS_KEY": "x" * 32},
        {},
        "secret key does not match",
    ),
    "no such bucket": (
        lambda s: s.env(),
        {"train.storage_path": "s3://no-such-bucket/ray"},
        "no-such-bucket",
    ),
    "S3 endpoint unreachable": (
        lambda s: s.env() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
        {},
        "is unreachable",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETUPS))
def test_bad_credentials_or_setup_stop_before_ray_or_any_run(
    case: str, stack: Stack, data_root: Path, tmp_path: Path
) -> None:
    make_env, overrides, expected = BAD_SETUPS[case]
    env = make_env(stack)
    if not env.get("AWS_ACCESS_KEY_ID", "set"):
        env = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS")}
    params = _params_file(tmp_path, data_root, **overrides)
    runs_before = len(_runs(stack))
    started = time.monotonic()

    done = _train(params, env)

    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert expected in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "Ray" not in done.stderr.replace(errors[0], ""), "refused before Ray starts"
    assert time.monotonic() - started < 60
    assert len(_runs(stack)) == runs_before, "refused before any MLflow run was created"
    assert not (tmp_path / "models").exists()


# --- a training on the stack, and its servers' faults -------------------------------------

EPOCHS = 6
ALL_EPOCHS = list(range(EPOCHS))


def _start(params: Path, env: dict[str, str], run_name: str, log: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "pipeline", "train", "-m", "mlp", "--params", str(params)]
    return subprocess.Popen(
        [*command, "--run-name", run_name],
        env=clean_env(**env),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_line(log: Path, text: str, process: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the training's log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _finish(process: subprocess.Popen[str], log: Path, timeout_s: float = 600) -> str:
    try:
        process.wait(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return log.read_text(errors="replace")


def _runs_named(stack: Stack, run_name: str) -> list[Any]:
    return [r for r in _runs(stack) if r.data.params.get(RUN_NAME_PARAM) == run_name]


def _the_run(stack: Stack, run_name: str) -> Any:
    runs = _runs_named(stack, run_name)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _steps(stack: Stack, run_id: str, key: str = "val/accuracy") -> list[int]:
    """The steps of a metric in the order MLflow stored them."""
    with stack.mlflow.client() as client:
        return [m.step for m in client.get_metric_history(run_id, key)]


def _logged_steps(stack: Stack, run_name: str) -> list[int]:
    """The steps logged so far by the run trained as `run_name` (none before it exists)."""
    runs = _runs_named(stack, run_name)
    return _steps(stack, runs[0].info.run_id) if runs else []


def _profile(tmp_path: Path, data_root: Path, run_name: str, **overrides: object) -> Path:
    storage = f"s3://mnist-dvc/ray/{run_name}"
    values = {"train.mlp.epochs": EPOCHS, "train.storage_path": storage} | overrides
    return _params_file(tmp_path, data_root, **values)


# A fault of a server the driver talks to does not depend on how many workers train: one
# worker starts in half the CPU time on this machine (the two-node runs are the outage's and
# the killed driver's).
ONE_WORKER = {"train.scaling.num_workers": 1}


@pytest.fixture(scope="module")
def on_cluster(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A training's environment on the token-auth Ray cluster (RAY_ADDRESS), whose nodes hold
    the stack's keys and the training settings, as a deployment's do: one Ray for the module's
    trainings, not a local one started by each."""
    nodes = stack.env() | TRAINING_ENV | LOCAL_RAY_TRAIN_ENV
    with ray_cluster(tmp_path_factory.mktemp("stack-ray"), **nodes) as cluster:
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
        yield stack.env() | auth | {"RAY_ADDRESS": cluster.gcs}


def test_mlflow_killed_mid_training_and_back_30_s_later_loses_nothing(
    stack: Stack, on_cluster: dict[str, str], data_root: Path, tmp_path: Path
) -> None:
    params = _profile(tmp_path, data_root, "outage")
    log = tmp_path / "train.log"
    process = _start(params, on_cluster, "outage", log)
    _wait_for_line(log, f"epoch 2/{EPOCHS}", process, 300)
    stack.mlflow.server.stop(signal.SIGKILL)
    killed, killed_at = time.monotonic(), time.time()
    try:
        time.sleep(30)
        # The workers went on without MLflow: by its return every epoch has trained.
        trained = re.findall(rf"epoch (\d+)/{EPOCHS} ", log.read_text(errors="replace"))
    finally:
        stack.mlflow.server.start()
    outage_s = time.monotonic() - killed
    output = _finish(process, log)

    assert process.returncode == 0, output[-3000:]
    assert outage_s >= 30
    assert sorted({int(epoch) for epoch in trained}) == list(range(1, EPOCHS + 1))
    run = _the_run(stack, "outage")
    assert run.info.status == "FINISHED"
    assert _steps(stack, run.info.run_id) == ALL_EPOCHS, "every epoch once, in order"
    with stack.mlflow.client() as client:
        logged = client.get_metric_history(run.info.run_id, "val/accuracy")
    later = [m.step for m in logged if m.timestamp / 1000 >= killed_at]
    assert later, "the epochs trained during the outage were logged once MLflow was back"
    print(
        f"\nMLflow down {outage_s:.0f} s; epochs trained by then (1-based): "
        f"{sorted(set(trained))}; epochs logged after it came back (0-based): {later}"
    )
    assert run.data.tags["model_uri"].startswith("models:/")
    assert (tmp_path / "models" / "mlp" / "model.pt").is_file()
    # The artifacts went through MLflow's proxy into its bucket, the checkpoints into the other.
    artifacts = stack.s3.keys("mlflow-artifacts")
    assert any(k.endswith("MLmodel") for k in artifacts), artifacts[:20]
    assert any(run.info.run_id in k for k in artifacts)
    checkpoints = stack.s3.keys("mnist-dvc", f"ray/outage/outage-{run.info.run_id}/")
    assert any(k.endswith("checkpoint.ckpt") for k in checkpoints), checkpoints


def test_mlflow_still_down_when_training_ends_fails_clearly_and_the_rerun_finishes(
    stack: Stack, on_cluster: dict[str, str], data_root: Path, tmp_path: Path
) -> None:
    params = _profile(tmp_path, data_root, "down", **ONE_WORKER)
    log = tmp_path / "train.log"
    env = on_cluster | {"TRACKING_WAIT_S": "5"}
    process = _start(params, env, "down", log)
    _wait_for_line(log, f"epoch 2/{EPOCHS}", process, 300)
    stack.mlflow.server.stop(signal.SIGKILL)
    try:
        output = _finish(process, log)
    finally:
        stack.mlflow.server.start()

    assert process.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert "unreachable for 5 s after training" in errors[0]
    assert "rerun the same command" in errors[0]
    assert not (tmp_path / "models").exists(), "nothing exported while MLflow is down"
    assert stack.s3.keys("mnist-dvc", "ray/down/"), "the checkpoints stay"

    again = _train(params, on_cluster, "--run-name", "down")
    assert again.returncode == 0, again.stderr[-3000:]
    run = _the_run(stack, "down")
    assert run.info.status == "FINISHED"
    assert _steps(stack, run.info.run_id) == ALL_EPOCHS
    assert (tmp_path / "models" / "mlp" / "model.pt").is_file()


def test_postgresql_restarted_mid_training_loses_nothing(
    stack: Stack, on_cluster: dict[str, str], data_root: Path, tmp_path: Path
) -> None:
    params = _profile(tmp_path, data_root, "pg", **ONE_WORKER)
    log = tmp_path / "train.log"
    process = _start(params, on_cluster, "pg", log)
    _wait_for_line(log, f"epoch 2/{EPOCHS}", process, 300)
    stack.postgres.stop("immediate")
    try:
        time.sleep(5)
    finally:
        stack.postgres.start()
    output = _finish(process, log)

    assert process.returncode == 0, output[-3000:]
    run = _the_run(stack, "pg")
    assert run.info.status == "FINISHED"
    assert _steps(stack, run.info.run_id) == ALL_EPOCHS


def test_killed_driver_resumes_from_its_checkpoint_in_the_bucket(
    stack: Stack, on_cluster: dict[str, str], data_root: Path, tmp_path: Path
) -> None:
    # Long enough that the kill lands mid-training although Ray's controller logs an epoch to
    # MLflow a second or more after its checkpoint.
    epochs = 30
    params = _profile(tmp_path, data_root, "resume", **{"train.mlp.epochs": epochs})
    log = tmp_path / "first.log"
    process = _start(params, on_cluster, "resume", log)
    _wait_for_line(log, f"epoch 3/{epochs}", process, 300)
    _until(lambda: _logged_steps(stack, "resume") != [], 60, "an epoch logged", log)
    # The cluster's nodes are this test's children; the training's workers run under them.
    workers = train_workers(psutil.Process())
    assert workers, "the training's workers, found on the cluster's nodes"
    os.killpg(process.pid, signal.SIGKILL)
    _finish(process, log)
    # The workers belong to the driver's job: the cluster stops them when the driver dies.
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"Ray workers outlived their driver: {alive}"
    first = _the_run(stack, "resume")
    assert first.info.status == "RUNNING"  # SIGKILL: nobody could close it
    at_kill = _steps(stack, first.info.run_id)
    folder = f"ray/resume/resume-{first.info.run_id}/"
    assert stack.s3.keys("mnist-dvc", folder)
    # What an upload cut short by a crash leaves: a newer checkpoint, half a file. Ray never
    # committed it, so it must not be what the run resumes from.
    stray = f"{folder}checkpoint_2999-01-01_00-00/checkpoint.ckpt"
    stack.s3.client().put_object(Bucket="mnist-dvc", Key=stray, Body=b"PK\x03\x04 cut short")

    again = _train(params, on_cluster, "--run-name", "resume")

    assert again.returncode == 0, again.stderr[-3000:]
    resumed = re.search(r"resuming run resume \(MLflow run (\w+)\) from epoch (\d+)", again.stderr)
    assert resumed is not None, again.stderr[-3000:]
    assert resumed.group(1) == first.info.run_id
    # From a checkpoint in the bucket, not from scratch; committed before logged, never after.
    assert int(resumed.group(2)) >= max(at_kill) + 1 >= 1
    run = _the_run(stack, "resume")
    assert run.info.status == "FINISHED"
    assert run.data.tags[RESUMES_TAG] == "1"
    assert _steps(stack, run.info.run_id) == list(range(epochs))
    assert history_epochs(tmp_path / "plots") == list(range(epochs))
    _, spec = load_model(tmp_path / "models" / "mlp")
    assert spec.run_id == run.info.run_id


# --- serving from the stack ----------------------------------------------------------------


def _register(stack: Stack, registry: Registry) -> str:
    """The session's trained CNN logged and registered in the stack, as the trainer; promoted."""
    from pipeline.data.prepared import open_prepared
    from pipeline.registry.versions import promote

    test = open_prepared(Path(registry.params.paths.prepared)).load("test")
    example = test.images[:2].astype(np.float32) / 255.0
    name = registry.name
    with stack.mlflow.client(stack.mlflow.trainer) as client:
        version = register_model(stack.mlflow.url, name, registry.net, example, 0.98)
        promote(client, name, version, pause_s=0.0)
    return version


def _digits(url: str, images: np.ndarray) -> list[int]:
    reply = httpx.post(f"{url}/v1/predict", json={"images": images.tolist()}, timeout=30)
    assert reply.status_code == 200, reply.text
    return [p["digit"] for p in reply.json()["predictions"]]


def _serve(stack: Stack, root: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    root.mkdir(exist_ok=True)
    port = free_port()
    env = clean_env(
        **stack.mlflow.env(stack.mlflow.serving),
        SERVING_CACHE_DIR=str(root / "cache"),
        SERVING_POLL_INTERVAL_S="1",
        SERVING_RETRY_FAILED_AFTER_S="1",
    )
    command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, f"http://127.0.0.1:{port}"


def _status(url: str, path: str) -> int:
    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _until(check: Any, timeout_s: float, what: str, log: Path | None = None) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            pytest.fail(f"{what}: not within {timeout_s} s\n{tail}")
        time.sleep(0.25)
    return time.monotonic() - started


def test_serving_outlives_an_mlflow_outage_and_one_started_during_it_waits(
    stack: Stack, registry: Registry, tmp_path: Path
) -> None:
    """One outage, two services: one serving when MLflow goes down, one started while it is."""
    from pipeline.data.prepared import open_prepared

    test = open_prepared(Path(registry.params.paths.prepared)).load("test")
    images, labels = test.images[:200].astype(np.float32) / 255.0, test.labels[:200]
    first = _register(stack, registry)
    up, url = _serve(stack, tmp_path / "up", tmp_path / "up.log")
    late: subprocess.Popen[bytes] | None = None
    try:
        _until(lambda: _status(url, "/health/ready") == 200, 180, "ready", tmp_path / "up.log")
        assert np.mean(np.array(_digits(url, images)) == labels) > 0.9

        stack.mlflow.server.stop(signal.SIGKILL)
        try:
            late, late_url = _serve(stack, tmp_path / "late", tmp_path / "late.log")
            time.sleep(3)  # a few polls fail
            assert _status(url, "/health/ready") == 200
            assert httpx.get(f"{url}/v1/model").json()["version"] == first
            assert np.mean(np.array(_digits(url, images)) == labels) > 0.9
            # Started while MLflow is down: live, not ready, no crash.
            _until(lambda: _status(late_url, "/health/live") == 200, 120, "live")
            time.sleep(5)
            assert _status(late_url, "/health/ready") == 503
            assert late.poll() is None, "no crash while MLflow is down"
        finally:
            stack.mlflow.server.start()
        _until(lambda: _status(late_url, "/health/ready") == 200, 120, "ready once MLflow is back")
        second = _register(stack, registry)
        _until(
            lambda: httpx.get(f"{url}/v1/model").json()["version"] == second,
            60,
            "the new champion served after MLflow came back",
        )
    finally:
        for process in (up, late):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)


def test_mlflow_models_serve_answers_with_the_serving_credentials(
    stack: Stack, registry: Registry, tmp_path: Path
) -> None:
    from pipeline.data.prepared import open_prepared

    _register(stack, registry)
    test = open_prepared(Path(registry.params.paths.prepared)).load("test")
    port = free_port()
    env = clean_env(**stack.mlflow.env(stack.mlflow.serving))
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m"]
    command += [f"models:/{registry.name}@champion", "--env-manager", "local", "-w", "1"]
    command += ["-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "mlflow-serve.log"
    process = subprocess.Popen(
        command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _until(
            lambda: _status(url, "/ping") == 200, 180, f"mlflow models serve:\n{log.read_text()}"
        )
        images = test.images[:50].astype(np.float32) / 255.0
        reply = httpx.post(f"{url}/invocations", json={"inputs": images.tolist()}, timeout=60)
        assert reply.status_code == 200, reply.text[:500]
        digits = np.asarray(reply.json()["predictions"]).argmax(axis=1)
        assert np.mean(digits == test.labels[:50]) > 0.9
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_s3_down_while_checkpointing_fails_clearly_and_the_rerun_resumes(
    stack: Stack, on_cluster: dict[str, str], data_root: Path, tmp_path: Path
) -> None:
    # No restarts: the stage fails at the first failed upload (Ray's retries while the store is
    # down would each start the workers anew), and the error path is the one checked.
    params = _profile(tmp_path, data_root, "s3down", **ONE_WORKER, **{"train.max_failures": 0})
    log = tmp_path / "first.log"
    process = _start(params, on_cluster, "s3down", log)
    _wait_for_line(log, f"epoch 2/{EPOCHS}", process, 300)
    stack.s3.server.stop(signal.SIGKILL)
    try:
        output = _finish(process, log)
    finally:
        stack.s3.server.start()

    assert process.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert "bucket 'mnist-dvc'" in errors[0], errors
    assert not (tmp_path / "models").exists()
    again = _train(params, on_cluster, "--run-name", "s3down")
    assert again.returncode == 0, again.stderr[-3000:]
    run = _the_run(stack, "s3down")
    assert run.info.status == "FINISHED"
    assert _steps(stack, run.info.run_id) == ALL_EPOCHS
    assert (tmp_path / "models" / "mlp" / "model.pt").is_file()
