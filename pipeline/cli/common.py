"""What every command shares: clean failures, the common options, params and the registry."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from mlflow.exceptions import MlflowException

from pipeline.config.base import ModelName
from pipeline.config.env import Settings
from pipeline.config.params import load_params

log = logging.getLogger("pipeline")

P = ParamSpec("P")
R = TypeVar("R")

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Params file to read.", dir_okay=False)
]
ModelOption = Annotated[ModelName, typer.Option("--model", "-m", help="Which model.")]


def fail_cleanly(command: Callable[P, R]) -> Callable[P, R]:
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


def client_and_name(params: Path) -> tuple[Any, str]:
    """The registry's client (its server checked) and the registered model's name."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import ensure_reachable, tracking_uri

    uri = tracking_uri(Settings())
    ensure_reachable(uri)
    return MlflowClient(uri), load_params(params).mlflow.registered_model
