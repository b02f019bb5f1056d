"""The pipeline as a Ray job: what a job of ours runs and ships (Ray's Jobs SDK does the rest;
with `RAY_AUTH_MODE=token` it also sends `RAY_AUTH_TOKEN`)."""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.exceptions import RayError
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.config.base import ModelName
from pipeline.tracking.lineage import git_commit
from pipeline.training.ray_env import TRAINING_ENV

# Never uploaded: environments, data, caches, local tracking stores, outputs. The cluster
# fetches its own data and writes to shared storage and the tracking server. Patterns are
# gitignore's: the outputs are anchored at the root ("/data/"), else they would also leave out
# the packages of the same name (pipeline/data, pipeline/models).
EXCLUDES = [
    "/.venv/",
    "/venv/",
    "/data/",
    "/models/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    ".ray_results/",
    ".serving-cache/",
    ".dvc/cache/",
    ".dvc/tmp/",
    "dvc_plots/",
    "__pycache__/",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "node_modules/",
]
# Passed to the job when set here: where to track, where the data is.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MNIST_MIRROR")
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


class SubmitError(RuntimeError):
    """The cluster refused the job or could not be reached."""


def train_entrypoint(model: ModelName, params_file: str, run_name: str) -> str:
    """A training job: the stages a local run goes through, same CLI."""
    m, p = f"--model {model}", f"--params {shlex.quote(params_file)}"
    train = f"train {m} --run-name {shlex.quote(run_name)}"
    steps = ("fetch", "prepare", train, f"evaluate {m}", f"register {m}")
    return " && ".join(f"python -m pipeline {step} {p}" for step in steps)


def repro_entrypoint(targets: list[str]) -> str:
    """`dvc repro`, told to do without git: Ray leaves .git out of the upload."""
    repro = " ".join(["dvc", "repro", *(shlex.quote(t) for t in targets)])
    return f"dvc config --local core.no_scm true && {repro}"


def runtime_env(project: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime env: the project (minus EXCLUDES) as working dir, and `env`."""
    if not (project / "pipeline").is_dir():
        raise SubmitError(f"{project} is not the project root (no pipeline/ package)")
    for key, value in env.items():
        if urlparse(value).password:
            raise SubmitError(
                f"{key} embeds a password; runtime env vars are visible on the dashboard. "
                "Set credentials on the cluster nodes instead."
            )
    return {"working_dir": str(project), "excludes": EXCLUDES, "env_vars": dict(env)}


def forwarded_env(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The malloc settings, FORWARDED_ENV where set here, the commit (no .git in the upload),
    then `extra`."""
    forwarded = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    return TRAINING_ENV | forwarded | {"PIPELINE_GIT_COMMIT": git_commit()} | dict(extra)


def job_id(kind: str) -> str:
    return f"mnist-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: JobStatus
    message: str | None


def connect(address: str) -> JobSubmissionClient:
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, RayError) as error:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {error}") from None


# A head that has just started answers this until its job agent has registered.
_AGENT_NOT_READY = "No available agent"
AGENT_WAIT_S = 60.0


def submit(
    client: JobSubmissionClient, entrypoint: str, env: dict[str, Any], submission_id: str
) -> str:
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env=env,
                submission_id=submission_id,
                metadata={"project": "mnist-pipeline"},
            )
        except (ConnectionError, RuntimeError, ValueError, RayError) as error:
            if _AGENT_NOT_READY in str(error) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(f"the cluster refused job {submission_id}: {error}") from None


async def _stream(client: JobSubmissionClient, job: str, out: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job):
        out(chunk)


def follow(client: JobSubmissionClient, job: str, out: Callable[[str], None]) -> JobOutcome:
    asyncio.run(_stream(client, job, out))
    # The log stream can close a moment before the status turns terminal.
    while (status := client.get_job_status(job)) not in TERMINAL:
        time.sleep(1.0)
    return JobOutcome(job, status, client.get_job_info(job).message)
