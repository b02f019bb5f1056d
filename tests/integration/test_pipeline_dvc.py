"""The DVC pipeline end to end, in a temporary copy of the repo, on a small profile; its outputs
pushed to the stack's S3 remote and pulled into a fresh clone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from testkit.stack import Stack
from tests.conftest import SMALL, copy_repo, raw_params, with_overrides


def _dvc(repo: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_nothing_to_do_then_push_and_pull(
    tmp_path: Path, mirror: Path, stack: Stack
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo(repo)
    params = with_overrides(raw_params(), SMALL | {"train.mlp.epochs": 2, "train.cnn.epochs": 2})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {
        "MNIST_MIRROR": str(mirror),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # Tests before this one may have run MLflow in-process, which exports its tracking URI.
    for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(inherited, None)

    first = _dvc(repo, "repro", env=env)
    stages = ("fetch", "prepare", "train@mlp", "train@cnn", "evaluate@mlp", "evaluate@cnn")
    for stage in (*stages, "register"):
        assert f"Running stage '{stage}'" in first
    # Embedded default tracking: a SQLite store in the project, the champion registered.
    assert (repo / "mlflow.db").is_file()
    decision = json.loads((repo / "reports" / "registry.json").read_text())
    assert decision["outcome"].startswith("promoted")
    assert decision["champion"] == decision["challenger"]
    for name in ("mlp", "cnn"):
        test = json.loads((repo / "metrics" / f"{name}.json").read_text())["test"]
        assert test["accuracy"] > 0.8, f"{name}: {test}"
        assert (repo / "models" / name / "model.pt").is_file()
    data_report = json.loads((repo / "metrics" / "data.json").read_text())
    assert data_report["train"]["total"] == SMALL["prepare.train_limit"] - SMALL["prepare.val_size"]

    second = _dvc(repo, "repro", env=env)
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second

    shown = _dvc(repo, "metrics", "show", "--json", env=env)
    assert "test.accuracy" in shown or '"accuracy"' in shown

    # `dvc exp run -S` overrides a param and reruns exactly the stages that read it.
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=repo, check=True, capture_output=True)
    experiment = _dvc(repo, "exp", "run", "-S", "train.mlp.lr=0.002", env=env)
    assert "Running stage 'train@mlp'" in experiment
    assert "Running stage 'evaluate@mlp'" in experiment
    assert "Running stage 'train@cnn'" not in experiment
    assert "Running stage 'prepare'" not in experiment
    assert "Running stage 'register'" in experiment

    # The outputs go to the stack's S3 remote and come back, byte for byte, into a fresh clone,
    # where nothing is left to run.
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "experiment"], cwd=repo, check=True, capture_output=True)
    remote_env = env | stack.s3.env()
    _dvc(repo, "push", "-r", "storage", env=remote_env)
    pushed = stack.s3.sizes("mnist-dvc", "dvc/")
    assert pushed, "nothing reached the remote"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, capture_output=True)
    started = time.monotonic()
    _dvc(clone, "pull", "-r", "storage", env=remote_env)
    pull_s = time.monotonic() - started
    outputs = [Path("data/raw"), Path("data/prepared"), Path("models/mlp"), Path("models/cnn")]
    for output in outputs:
        assert _tree(clone / output) == _tree(repo / output), output
    assert "Running stage" not in _dvc(clone, "repro", env=env)
    assert "in sync" in _dvc(clone, "status", "-c", "-r", "storage", env=remote_env)
    print(f"\ndvc push: {len(pushed)} objects, {sum(pushed.values()):,} bytes; pull {pull_s:.1f} s")


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, as its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
