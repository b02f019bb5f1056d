"""`mnist-pipeline`: one subcommand per stage; `dvc.yaml` calls these."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer

from pipeline.config import DEFAULT_PARAMS_FILE, MODEL_NAMES, ModelName, Params, load_params
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
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


def _params(path: Path) -> Params:
    return load_params(path)


@app.callback()
def _configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
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
        str | None, typer.Option(help="Ray Train run name (default: model and time).")
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
def evaluate(model: ModelOption, params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Score a trained model on the test split; write metrics and plots."""
    from pipeline import evaluate as stage

    name = model
    result = stage.run(_params(params), name)
    log.info("%s: test/accuracy %.4f  test/loss %.4f", name, result.accuracy, result.loss)


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
