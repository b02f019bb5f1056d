"""The deployed stack for real (PostgreSQL, SeaweedFS's S3, MLflow with basic auth, started by
the entrypoints Compose runs): bad credentials and set-up are refused before any work, a
training tracks and checkpoints into it and survives its servers' faults, DVC pushes to it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testkit.cluster import clean_env
from testkit.processes import free_port
from testkit.stack import Stack, running_stack
from tests.conftest import SMALL, raw_params, with_overrides


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


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
