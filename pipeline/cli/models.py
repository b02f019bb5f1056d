"""Commands for registered models: the registry's aliases, pull, predict, serve."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import ParamsOption, client_and_name, fail_cleanly
from pipeline.config.params import DEFAULT_PARAMS_FILE

registry_app = typer.Typer(help="Inspect and move the registry's aliases.", no_args_is_help=True)


@registry_app.command("show")
@fail_cleanly
def registry_show(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Versions, aliases and test metrics of the registered model."""
    from pipeline.registry.versions import HISTORY_TAG

    client, name = client_and_name(params)
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
@fail_cleanly
def registry_promote(
    version: Annotated[str, typer.Option("--version", help="Version to make champion.")],
    params: ParamsOption = DEFAULT_PARAMS_FILE,
) -> None:
    """Make a version the champion (no gate: a deliberate, manual decision)."""
    from pipeline.registry.versions import promote

    client, name = client_and_name(params)
    winner = promote(client, name, version)
    typer.echo(f"{name}@champion -> version {winner}")
    if winner != version:
        raise typer.Exit(1)


@registry_app.command("rollback")
@fail_cleanly
def registry_rollback(params: ParamsOption = DEFAULT_PARAMS_FILE) -> None:
    """Move the champion back to the previous champion."""
    from pipeline.registry.versions import rollback

    client, name = client_and_name(params)
    typer.echo(f"{name}@champion -> version {rollback(client, name)}")


@fail_cleanly
def pull(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to create.", file_okay=False)],
    alias: Annotated[str | None, typer.Option(help="Alias to pull (default: champion).")] = None,
    version: Annotated[
        str | None, typer.Option(help="Version to pull instead of an alias.")
    ] = None,
    params: ParamsOption = DEFAULT_PARAMS_FILE,
) -> None:
    """Download a registered model and its metadata into a folder, verified."""
    from pipeline.registry.pull import pull as pull_model

    if alias and version:
        raise ValueError("give --alias or --version, not both")
    client, name = client_and_name(params)
    metadata = pull_model(client, name, out, alias=alias, version=version)
    typer.echo(
        f"pulled {name} version {metadata['version']} ({metadata['model_type']}, "
        f"test accuracy {metadata['metrics']['test_accuracy']:.4f}) -> {out}"
    )


@fail_cleanly
def predict(
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG files.", exists=True)],
    model: Annotated[Path, typer.Option("--model", help="A folder made by `pull`.")],
    max_pixels: Annotated[
        int | None, typer.Option(help="Pixel budget per image (default 4096 x 4096).", min=1)
    ] = None,
) -> None:
    """Predict the digit in each image with a pulled model (one JSON line per image). A refused
    image (not PNG/JPEG, too large, damaged, blank) gets {"file", "error", "kind"}: exit 1."""
    from pipeline.data.digits import MAX_PIXELS
    from pipeline.registry.pull import predict_files

    results = predict_files(model, images, max_pixels or MAX_PIXELS)
    for result in results:
        typer.echo(json.dumps(result))
    if any("error" in result for result in results):
        raise typer.Exit(1)


@fail_cleanly
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the registered model over HTTP (settings: SERVING_* and MLFLOW_TRACKING_URI)."""
    # The service owns its entry point: pipeline never imports services (no package cycle).
    command = [sys.executable, "-m", "services.serving", "--host", host, "--port", str(port)]
    os.execv(sys.executable, command)
