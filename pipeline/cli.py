"""`mnist-pipeline`: one subcommand per stage; `dvc.yaml` calls these."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from mlflow.exceptions import MlflowException

from pipeline.config import DEFAULT_PARAMS_FILE, MODEL_NAMES, ModelName, Params, load_params
from pipeline.preprocess import MAX_PIXELS
from pipeline.settings import Settings

app = typer.Typer(
    help="MNIST pipeline: fetch, prepare, train on Ray, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("pipeline")

P = ParamSpec("P")
R = TypeVar("R")

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Params file to read.", dir_okay=False)
]
ModelOption = Annotated[ModelName, typer.Option("--model", "-m", help="Which model.")]


def _fail_cleanly(command: Callable[P, R]) -> Callable[P, R]:
    """Expected failures (bad params, data, mirrors) end in one clear message, exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except (ValueError, OSError, RuntimeError, MlflowException) as error:
            log.debug("traceback (shown with --verbose)", exc_info=True)
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


def _params(path: Path) -> Params:
    return load_params(path)


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    # Per-file download bars drown the log; the stages log what they fetch.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@app.command()
@_fail_cleanly
def fetch(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Download the four MNIST files (MNIST_MIRROR first), verified by SHA-256."""
    from pipeline import fetch as stage

    stage.run(_params(params), Settings())


@app.command()
@_fail_cleanly
def prepare(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Parse the IDX files, split train/val (seeded), store uint8 arrays and a data report."""
    from pipeline import prepare as stage

    report = stage.run(_params(params))
    log.info("prepared %s", {split: counts["total"] for split, counts in report.items()})


@app.command()
@_fail_cleanly
def train(
    model: ModelOption,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    run_name: Annotated[
        str | None,
        typer.Option(
            help="Run name (default: the model's); an unfinished run of the same name, params "
            "and data resumes from its latest checkpoint."
        ),
    ] = None,
) -> None:
    """Train one model on Ray Train workers and export its best checkpoint."""
    name = model
    config = _params(params)
    from pipeline.train import train_model

    outcome = train_model(config, name, Settings(), run_name)
    log.info(
        "%s: best val/accuracy %.4f at epoch %d -> %s",
        name,
        outcome.spec.val_accuracy,
        outcome.spec.epoch,
        outcome.model_file,
    )


@app.command()
@_fail_cleanly
def tune(
    model: ModelOption,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    name: Annotated[
        str | None,
        typer.Option(help="Search name (default: tune-<model>); an unfinished one resumes."),
    ] = None,
) -> None:
    """Search hyperparameters (Ray Tune: Optuna + ASHA); write the best as a params file."""
    from pipeline.tune import tune_model

    outcome = tune_model(_params(params), model, Settings(), name)
    log.info(
        "%s: best val/accuracy %.4f (trial %s) of %d trials (%d stopped early, %d failed) "
        "in %.0f s -> %s",
        outcome.search_name,
        outcome.best_accuracy,
        outcome.best_trial,
        outcome.trials,
        outcome.stopped_early,
        outcome.failed,
        outcome.wall_s,
        outcome.best_file,
    )
    typer.echo(f"retrain, evaluate and register it with:\n  {outcome.apply_command}")


@app.command()
@_fail_cleanly
def evaluate(model: ModelOption, params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Score a trained model on the test split; write metrics and plots."""
    from pipeline import evaluate as stage

    name = model
    result = stage.run(_params(params), name, Settings())
    log.info("%s: test/accuracy %.4f  test/loss %.4f", name, result.accuracy, result.loss)


@app.command()
@_fail_cleanly
def register(
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    model: Annotated[
        ModelName | None, typer.Option("--model", "-m", help="Only this model (default: all).")
    ] = None,
) -> None:
    """Register every trained model; alias the best `challenger`, gate it to `champion`."""
    from pipeline import register as stage

    decision = stage.run(_params(params), Settings(), (model,) if model else MODEL_NAMES)
    log.info(
        "%s: %s (champion: version %s)",
        decision.registered_model,
        decision.outcome,
        decision.champion,
    )


registry_app = typer.Typer(help="Inspect and move the registry's aliases.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


def _client_and_name(params: Path) -> tuple[Any, str]:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import ensure_reachable, tracking_uri

    uri = tracking_uri(Settings())
    ensure_reachable(uri)
    return MlflowClient(uri), _params(params).mlflow.registered_model


@registry_app.command("show")
@_fail_cleanly
def registry_show(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Versions, aliases and test metrics of the registered model."""
    from pipeline.registry import HISTORY_TAG

    client, name = _client_and_name(params)
    model = client.get_registered_model(name)
    typer.echo(f"{name}  champion history: {model.tags.get(HISTORY_TAG, '[]')}")
    typer.echo(f"{'version':>7}  {'type':<4}  {'test acc':>8}  {'aliases':<20}  run")
    aliases: dict[str, list[str]] = {}
    for alias, number in model.aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"])
    for version in versions:
        typer.echo(
            f"{version.version:>7}  {version.tags.get('model_type', '?'):<4}  "
            f"{float(version.tags.get('test_accuracy', 'nan')):>8.4f}  "
            f"{','.join(sorted(aliases.get(str(version.version), []))):<20}  {version.run_id}"
        )


@registry_app.command("promote")
@_fail_cleanly
def registry_promote(
    version: Annotated[str, typer.Option("--version", help="Version to make champion.")],
    params: ParamsOption = DEFAULT_PARAMS_FILE,
) -> None:
    """Make a version the champion (no gate: a deliberate, manual decision)."""
    from pipeline.registry import promote

    client, name = _client_and_name(params)
    winner = promote(client, name, version)
    typer.echo(f"{name}@champion -> version {winner}")
    if winner != version:
        raise typer.Exit(1)


@registry_app.command("rollback")
@_fail_cleanly
def registry_rollback(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Move the champion back to the previous champion."""
    from pipeline.registry import rollback

    client, name = _client_and_name(params)
    typer.echo(f"{name}@champion -> version {rollback(client, name)}")


@app.command()
@_fail_cleanly
def pull(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to create.", file_okay=False)],
    alias: Annotated[str | None, typer.Option(help="Alias to pull (default: champion).")] = None,
    version: Annotated[
        str | None, typer.Option(help="Version to pull instead of an alias.")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
) -> None:
    """Download a registered model and its metadata into a folder, verified."""
    from pipeline.pull import pull as pull_model

    if alias and version:
        raise ValueError("give --alias or --version, not both")
    client, name = _client_and_name(params)
    metadata = pull_model(client, name, out, alias=alias, version=version)
    typer.echo(
        f"pulled {name} version {metadata['version']} ({metadata['model_type']}, "
        f"test accuracy {metadata['metrics']['test_accuracy']:.4f}) -> {out}"
    )


@app.command()
@_fail_cleanly
def predict(
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.", exists=True)],
    model: Annotated[Path, typer.Option("--model", help="A folder made by `pull`.")],
    max_pixels: Annotated[int, typer.Option(help="Pixel budget per image.", min=1)] = MAX_PIXELS,
) -> None:
    """Predict the digit in each image with a pulled model (one JSON line per image). A refused
    image (not PNG/JPEG, too large, damaged, blank) gets {"file", "error", "kind"}: exit 1."""
    from pipeline.pull import predict_files

    results = predict_files(model, images, max_pixels)
    for result in results:
        typer.echo(json.dumps(result))
    if any("error" in result for result in results):
        raise typer.Exit(1)


@app.command()
@_fail_cleanly
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the registered model over HTTP (settings: SERVING_* and MLFLOW_TRACKING_URI)."""
    import uvicorn

    from services.serving.app import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info", access_log=False)


submit_app = typer.Typer(
    help="Run the pipeline as a Ray job on a cluster (RAY_API_SERVER_ADDRESS; token auth from "
    "RAY_AUTH_MODE/RAY_AUTH_TOKEN).",
    no_args_is_help=True,
)
app.add_typer(submit_app, name="submit")
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
    typer.echo(
        f"job {job}: {outcome.status.value}" + (f" ({outcome.message})" if outcome.message else ""),
        err=True,
    )
    if outcome.status.value != "SUCCEEDED":
        raise typer.Exit(1)


@submit_app.command("train")
@_fail_cleanly
def submit_train(
    model: ModelOption,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    address: AddressOption = None,
    env: EnvOption = None,
    wait: WaitOption = True,
) -> None:
    """Fetch, prepare, train, evaluate and register one model as a Ray job."""
    from pipeline import submit as jobs

    _params(params)  # a bad params file fails here, not minutes later on the cluster
    run_name = jobs.job_id(f"train-{model}")
    _run_job(run_name, jobs.train_entrypoint(model, str(params), run_name), address, env, wait)


@submit_app.command("repro")
@_fail_cleanly
def submit_repro(
    targets: Annotated[list[str] | None, typer.Argument(help="Stages (default: all).")] = None,
    address: AddressOption = None,
    env: EnvOption = None,
    wait: WaitOption = True,
) -> None:
    """Run `dvc repro` (the whole pipeline, or TARGETS) as a Ray job."""
    from pipeline import submit as jobs

    _params(DEFAULT_PARAMS_FILE)
    _run_job(jobs.job_id("repro"), jobs.repro_entrypoint(targets or []), address, env, wait)


@app.command()
@_fail_cleanly
def summary(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """What the pipeline produced: accuracy per model and where the outputs are."""
    paths = _params(params).paths
    typer.echo(f"{'model':<6} {'test accuracy':>14} {'test loss':>10}  artifact")
    for name in MODEL_NAMES:
        metrics_file = Path(paths.metrics) / f"{name}.json"
        if not metrics_file.is_file():
            typer.echo(f"{name:<6} {'(not evaluated)':>14}")
            continue
        test = json.loads(metrics_file.read_text())["test"]
        artifact = Path(paths.models) / name / "model.pt"
        typer.echo(f"{name:<6} {test['accuracy']:>14.2%} {test['loss']:>10.4f}  {artifact}")
    typer.echo(f"metrics: {paths.metrics}/   curves and confusion: {paths.plots}/")
    typer.echo("plots:   dvc plots show   (writes dvc_plots/index.html)")


if __name__ == "__main__":
    app()
