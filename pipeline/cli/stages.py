"""One command per pipeline stage (what dvc.yaml runs), and the summary of what they made; each
imports its stage when it runs, so that `--help` and the other stages stay fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ModelOption, ParamsOption, fail_cleanly, log
from pipeline.config.base import MODEL_NAMES, ModelName
from pipeline.config.env import Settings
from pipeline.config.params import DEFAULT_PARAMS_FILE, load_params


@fail_cleanly
def fetch(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Download the four MNIST files (MNIST_MIRROR first), verified by SHA-256."""
    from pipeline.data import fetch as stage

    stage.run(load_params(params), Settings())


@fail_cleanly
def prepare(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Parse the IDX files, split train/val (seeded), store uint8 arrays and a data report."""
    from pipeline.data import prepare as stage

    report = stage.run(load_params(params))
    log.info("prepared %s", {split: counts["total"] for split, counts in report.items()})


@fail_cleanly
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
    from pipeline.training.ray_env import preflight

    config, settings = load_params(params), Settings()
    preflight(config, settings)  # bad params or set-up fail at once, before the slow import
    from pipeline.training.driver import train_model

    outcome = train_model(config, model, settings, run_name)
    spec, file = outcome.spec, outcome.model_file
    log.info(
        "%s: best val/accuracy %.4f at epoch %d -> %s", model, spec.val_accuracy, spec.epoch, file
    )


@fail_cleanly
def tune(
    model: ModelOption,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    name: Annotated[
        str | None,
        typer.Option(help="Search name (default: tune-<model>); an unfinished one resumes."),
    ] = None,
) -> None:
    """Search hyperparameters (Ray Tune: Optuna + ASHA); write the best as a params file."""
    from pipeline.training.ray_env import preflight

    config, settings = load_params(params), Settings()
    preflight(config, settings)
    from pipeline.tune.search import tune_model

    outcome = tune_model(config, model, settings, name)
    log.info(
        "%s: best val/accuracy %.4f (trial %s) of %d trials (%d stopped early, %d failed) "
        "in %.0f s -> %s",
        *(outcome.search_name, outcome.best_accuracy, outcome.best_trial, outcome.trials),
        *(outcome.stopped_early, outcome.failed, outcome.wall_s, outcome.best_file),
    )
    typer.echo(f"retrain, evaluate and register it with:\n  {outcome.apply_command}")


@fail_cleanly
def evaluate(model: ModelOption, params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Score a trained model on the test split; write metrics and plots."""
    from pipeline import evaluate as stage

    result = stage.run(load_params(params), model, Settings())
    log.info("%s: test/accuracy %.4f  test/loss %.4f", model, result.accuracy, result.loss)


@fail_cleanly
def register(
    params: ParamsOption = DEFAULT_PARAMS_FILE,
    model: Annotated[
        ModelName | None, typer.Option("--model", "-m", help="Only this model (default: all).")
    ] = None,
) -> None:
    """Register every trained model; alias the best `challenger`, gate it to `champion`."""
    from pipeline.registry import register as stage

    decision = stage.run(load_params(params), Settings(), (model,) if model else MODEL_NAMES)
    what = (decision.registered_model, decision.outcome, decision.champion)
    log.info("%s: %s (champion: version %s)", *what)


@fail_cleanly
def summary(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """What the pipeline produced: accuracy per model and where the outputs are."""
    paths = load_params(params).paths
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
