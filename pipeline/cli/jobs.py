"""`submit`: the pipeline as Ray jobs on a cluster (the Jobs SDK in pipeline.submit)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ModelOption, ParamsOption, fail_cleanly
from pipeline.config.env import Settings
from pipeline.config.params import DEFAULT_PARAMS_FILE, load_params

submit_app = typer.Typer(
    help="Run the pipeline as a Ray job on a cluster (RAY_API_SERVER_ADDRESS; token auth from "
    "RAY_AUTH_MODE/RAY_AUTH_TOKEN).",
    no_args_is_help=True,
)
AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, local)."),
]
EnvOption = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        help="KEY=VALUE for the job (repeatable); MLFLOW_TRACKING_URI and "
        "MNIST_MIRROR are passed when set.",
    ),
]
WaitOption = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Stream the logs and exit with the job's status.")
]


def _run_job(
    submission_id: str, entrypoint: str, address: str | None, env: list[str] | None, wait: bool
) -> None:
    from pipeline import submit as jobs

    pairs = dict(item.split("=", 1) for item in env or [] if "=" in item)
    if len(pairs) != len(env or []):
        raise ValueError(f"--env takes KEY=VALUE, got {env}")
    client = jobs.connect(address or Settings().jobs_address())
    runtime = jobs.runtime_env(Path.cwd(), jobs.forwarded_env(os.environ, pairs))
    job = jobs.submit(client, entrypoint, runtime, submission_id)
    typer.echo(f"submitted {job}: {entrypoint}", err=True)
    if not wait:
        return
    try:
        outcome = jobs.follow(client, job, lambda text: typer.echo(text, nl=False))
    except KeyboardInterrupt:
        client.stop_job(job)
        typer.echo(f"\ninterrupted: job {job} stopped", err=True)
        raise typer.Exit(130) from None
    detail = f" ({outcome.message})" if outcome.message else ""
    typer.echo(f"job {job}: {outcome.status.value}{detail}", err=True)
    if outcome.status.value != "SUCCEEDED":
        raise typer.Exit(1)


@submit_app.command("train")
@fail_cleanly
def submit_train(
    model: ModelOption,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    address: AddressOption = None,
    env: EnvOption = None,
    wait: WaitOption = True,
) -> None:
    """Fetch, prepare, train, evaluate and register one model as a Ray job."""
    from pipeline import submit as jobs

    load_params(params)  # a bad params file fails here, not minutes later on the cluster
    run_name = jobs.job_id(f"train-{model}")
    _run_job(run_name, jobs.train_entrypoint(model, str(params), run_name), address, env, wait)


@submit_app.command("repro")
@fail_cleanly
def submit_repro(
    targets: Annotated[list[str] | None, typer.Argument(help="Stages (default: all).")] = None,
    address: AddressOption = None,
    env: EnvOption = None,
    wait: WaitOption = True,
) -> None:
    """Run `dvc repro` (the whole pipeline, or TARGETS) as a Ray job."""
    from pipeline import submit as jobs

    load_params(DEFAULT_PARAMS_FILE)
    _run_job(jobs.job_id("repro"), jobs.repro_entrypoint(targets or []), address, env, wait)
