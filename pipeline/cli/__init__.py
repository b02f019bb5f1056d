"""`mnist-pipeline`: one subcommand per stage (dvc.yaml calls these), the registry's commands
and Ray jobs. Every command is listed here; each lives in the module of its kind."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from pipeline.cli import jobs, models, stages

MLFLOW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
app = typer.Typer(
    help="MNIST pipeline: fetch, prepare, train on Ray, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
commands: list[Callable[..., None]] = [stages.fetch, stages.prepare, stages.train, stages.tune]
commands += [stages.evaluate, stages.register, models.pull, models.predict, models.serve]
for command in [*commands, stages.summary]:
    app.command()(command)
app.add_typer(models.registry_app, name="registry")
app.add_typer(jobs.submit_app, name="submit")


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    # Per-file download bars drown the log; the stages log what they fetch.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's default retries wait about four minutes per call on a server that is down; the
    # commands wait for it where waiting makes sense (TRACKING_WAIT_S) and fail fast elsewhere.
    for key, value in MLFLOW_RETRIES.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    app()
