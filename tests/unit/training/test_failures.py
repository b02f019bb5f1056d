"""Failure and resume decisions without training: damaged checkpoints, which run is resumed,
the failure line, run names."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import Param, Run, RunData, RunInfo, RunTag
from ray.exceptions import ActorDiedError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.tracking.runs import RUN_NAME_PARAM, resume_decision
from pipeline.training.driver import describe_failure, train_model
from pipeline.training.worker import CheckpointError, verified_checkpoint


def test_a_damaged_checkpoint_is_refused_by_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint\.ckpt cannot be loaded"):
        verified_checkpoint(tmp_path)
    (tmp_path / "checkpoint.ckpt").write_bytes(b"PK\x03\x04 cut short by a crash")
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoint.ckpt")):
        verified_checkpoint(tmp_path)


def _run(status: str, params: dict[str, str], digest: str = "d1") -> Run:
    info = RunInfo("r1", "0", "", status, 0, None, "active")
    data = RunData(
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("data.digest", digest)],
    )
    return Run(info, data)


def test_only_an_unfinished_run_of_the_same_params_and_data_is_resumed() -> None:
    wanted = {RUN_NAME_PARAM: "x", "train.mlp.lr": "0.003"}
    assert resume_decision(None, wanted, "d1")[0] is None
    assert resume_decision(_run("FAILED", wanted), wanted, "d1")[0] == "r1"
    assert resume_decision(_run("RUNNING", wanted), wanted, "d1")[0] == "r1"
    finished, why = resume_decision(_run("FINISHED", wanted), wanted, "d1")
    assert finished is None
    assert "never resumed" in why
    changed, why = resume_decision(_run("FAILED", wanted | {"train.mlp.lr": "0.1"}), wanted, "d1")
    assert changed is None
    assert "train.mlp.lr: 0.1 -> 0.003" in why
    assert resume_decision(_run("FAILED", wanted, digest="d0"), wanted, "d1")[0] is None


def test_the_failure_names_the_dead_worker_first() -> None:
    error = WorkerGroupError(
        "two workers failed",
        {
            0: RuntimeError("Connection closed by peer\n  at gloo"),
            # How Ray reports a worker its health check found dead.
            1: WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError()),
        },
    )
    message = describe_failure(error, "mlp", 2, 4, 0)
    assert message.startswith(
        "training mlp failed in epoch 2 (of 0-3), beyond train.max_failures=0"
    )
    assert message.index("worker rank 1: ActorDiedError") < message.index(
        "worker rank 0: RuntimeError: Connection closed by peer"
    )
    assert "at gloo" not in message


def test_a_run_name_that_is_no_folder_name_is_refused(params: Params) -> None:
    with pytest.raises(ValueError, match="run name 'a b'"):
        train_model(params, "mlp", Settings(), run_name="a b")
