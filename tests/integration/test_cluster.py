"""A real two-node Ray cluster with token auth: jobs submitted by `ray job submit` and by
`mnist-pipeline submit` train, track and register; bad tokens and node-local storage are
refused.

The second node runs in its own mount namespace with a tmpfs over one folder: that folder is
then node-local for real, which is how the storage check is put to the test on one machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.submit import EXCLUDES
from testkit.cluster import CAN_MASK, Cluster, ray_cluster
from testkit.processes import clean_env
from testkit.stack import Stack
from tests.conftest import REPO, SMALL, copy_repo, free_port, raw_params, with_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> Iterator[Cluster]:
    """The nodes hold the stack's credentials, as a deployment gives them (never a job)."""
    with ray_cluster(tmp_path_factory.mktemp("cluster"), **stack.env()) as running:
        yield running


def _project(tmp_path: Path, storage: Path | str, model_epochs: int = 2) -> Path:
    """A fresh copy of the project with small params; checkpoints to `storage`."""
    project = tmp_path / "project"
    project.mkdir()
    copy_repo(project)
    overrides = SMALL | {
        "prepare.train_limit": 2000,
        "train.mlp.epochs": model_epochs,
        "train.storage_path": str(storage),
    }
    (project / "params.yaml").write_text(
        yaml.safe_dump(with_overrides(raw_params(), overrides), sort_keys=False)
    )
    return project


def _registered(uri: str, name: str = "mnist-classifier") -> list[Any]:
    return MlflowClient(uri).search_model_versions(f"name = '{name}'")


def _authorized_python(cluster: Cluster, code: str, cwd: Path | None = None) -> str:
    """Run `code` in a fresh interpreter holding the token: Ray reads auth settings once per
    process, and this test process also runs a local Ray without auth."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _job_count(cluster: Cluster) -> int:
    code = (
        "from ray.job_submission import JobSubmissionClient as C; "
        f"print(len(C({cluster.dashboard!r}).list_jobs()))"
    )
    return int(_authorized_python(cluster, code))


def _submit_cli(
    project: Path, cluster: Cluster, token: str | None, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    auth = {"RAY_AUTH_MODE": "token"} | ({"RAY_AUTH_TOKEN": token} if token else {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", *args, "--address", cluster.dashboard],
        cwd=project,
        env=clean_env(**auth, **env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_mnist_pipeline_submit_trains_tracks_and_registers_on_the_stack(
    cluster: Cluster, tmp_path: Path, stack: Stack, mirror: Path
) -> None:
    project = _project(tmp_path, "s3://mnist-dvc/ray/submit")
    with stack.mlflow.client() as client:
        before = {v.version for v in client.search_model_versions("name = 'mnist-classifier'")}

    done = _submit_cli(
        project,
        cluster,
        cluster.token,
        "train",
        "--model",
        "mlp",
        MLFLOW_TRACKING_URI=stack.mlflow.url,
        MNIST_MIRROR=str(mirror),
    )

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "SUCCEEDED" in done.stderr
    assert "test/accuracy" in done.stdout  # the job's own log, streamed back
    with stack.mlflow.client() as client:
        versions = client.search_model_versions("name = 'mnist-classifier'")
        new = [v for v in versions if v.version not in before]
        assert len(new) == 1, "the job registers exactly one new version"
        run = client.get_run(new[0].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["ray.num_workers"] == "2"  # 1 CPU per node: both nodes trained
    assert run.data.params["ray.cluster"] == "external"
    assert float(run.data.metrics["test/accuracy"]) > 0.85
    # Logged as the trainer (the nodes' credentials), artifacts in MLflow's bucket through its
    # proxy, checkpoints in the other bucket under the job's run name.
    assert run.info.user_id == stack.mlflow.trainer.username
    assert any(run.info.run_id in key for key in stack.s3.keys("mlflow-artifacts"))
    run_name = run.data.params["ray.run_name"]  # the job's id
    checkpoints = stack.s3.keys("mnist-dvc", f"ray/submit/{run_name}-{run.info.run_id}/")
    assert any(key.endswith("checkpoint.ckpt") for key in checkpoints), checkpoints


def test_ray_job_submit_cli_runs_the_stages(
    cluster: Cluster, tmp_path: Path, mlflow_server: str, mirror: Path
) -> None:
    project = _project(tmp_path, cluster.shared_folder / "cli")
    before = {v.version for v in _registered(mlflow_server)}
    stages = " && ".join(
        f"python -m pipeline {stage}"
        for stage in ("fetch", "prepare", "train -m mlp", "evaluate -m mlp", "register -m mlp")
    )
    runtime = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server, "MNIST_MIRROR": str(mirror)}}
    done = subprocess.run(
        [
            "ray", "job", "submit",
            "--address", cluster.dashboard,
            "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime),
            "--", "sh", "-c", stages,
        ],
        cwd=project,
        env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token),
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    assert len([v for v in _registered(mlflow_server) if v.version not in before]) == 1


def test_submit_repro_runs_dvc_in_the_job(cluster: Cluster, tmp_path: Path, mirror: Path) -> None:
    """DVC runs in the upload, which has no .git; fetch and prepare are cheap targets."""
    project = _project(tmp_path, cluster.shared_folder / "repro")

    done = _submit_cli(
        project, cluster, cluster.token, "repro", "prepare", MNIST_MIRROR=str(mirror)
    )

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "Running stage 'fetch'" in done.stdout
    assert "Running stage 'prepare'" in done.stdout
    assert "SUCCEEDED" in done.stderr


def test_upload_leaves_out_environments_data_and_stores(cluster: Cluster, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    copy_repo(project)
    for junk in (".venv/bin/python", "data/raw/x", "mlruns/0/meta.yaml", "mlflow.db"):
        (project / junk).parent.mkdir(parents=True, exist_ok=True)
        (project / junk).write_text("must not be uploaded")
    check = " && ".join(
        [f"test ! -e {p.rstrip('/')}" for p in (".venv", "data", "mlruns", "mlflow.db")]
        + ["test -f pipeline/submit.py", "test -f params.yaml"]
        + ["test -f pipeline/data/fetch.py", "test -f pipeline/models/networks.py"]
    )
    code = f"""
from pathlib import Path
from pipeline import submit as jobs
client = jobs.connect({cluster.dashboard!r})
env = jobs.runtime_env(Path({str(project)!r}), {{}})
job = jobs.submit(client, {check!r}, env, jobs.job_id("upload"))
outcome = jobs.follow(client, job, lambda text: None)
print(outcome.status.value, outcome.message)
"""
    status = _authorized_python(cluster, code, cwd=REPO)
    assert status.startswith("SUCCEEDED"), status
    assert {"/.venv/", "/data/", "mlruns/", "mlflow.db"} <= set(EXCLUDES)


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
def test_submission_without_the_right_token_is_refused(
    cluster: Cluster, tmp_path: Path, token: str | None
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    copy_repo(project)
    jobs_before = _job_count(cluster)

    done = _submit_cli(project, cluster, token, "train", "--model", "mlp", "--no-wait")

    assert done.returncode == 1
    assert "error:" in done.stderr, done.stderr[-2000:]
    assert "uthentication" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert _job_count(cluster) == jobs_before, "a refused submission must create no job"


def test_unreachable_jobs_api_is_a_clear_error(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    copy_repo(project)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", "train", "-m", "cnn"]
        + ["--address", f"http://127.0.0.1:{free_port()}"],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "cannot reach the Ray Jobs API" in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(not CAN_MASK, reason="needs root and unshare to make a node-local folder")
def test_node_local_storage_is_refused_before_training(
    cluster: Cluster, tmp_path: Path, data_root: Path
) -> None:
    overrides = SMALL | {
        "paths.raw": str(data_root / "raw"),
        "paths.prepared": str(data_root / "prepared"),
        "paths.models": str(tmp_path / "models"),
        "train.storage_path": str(cluster.local_folder / "run"),
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(with_overrides(raw_params(), overrides), sort_keys=False))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()

    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "-m", "mlp", "--params", str(params)],
        env=clean_env(
            RAY_ADDRESS=cluster.gcs,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=cluster.token,
            MLFLOW_TRACKING_URI=store,
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 1
    assert "train.storage_path" in done.stderr, done.stderr[-3000:]
    assert "cannot see it" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert not (tmp_path / "models").exists()
    runs = MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()]
    )
    assert runs == [], "refused before any MLflow run was opened"
