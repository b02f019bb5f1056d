"""The serving app on Ray Serve: the same FastAPI app (`create_app`), one per replica.

    serve run services/serving/serve_config.yaml                  # replicas, autoscaling, env
    serve run services.serving.ray_app:build_app model_uri=models:/mnist-classifier@champion

How it fits Ray Serve 2.60:

- The app is built *inside each replica* (`@serve.ingress()` without an app, plus
  `__serve_build_asgi_app__`). A prebuilt app cannot be passed to `serve.ingress(app)`: Serve
  pickles it, and its Prometheus registry holds a lock that does not pickle. Building it in the
  replica also gives each replica its own holder, batcher and metrics.
- Serve runs the ASGI lifespan of the ingress app in each replica (uvicorn's `LifespanOn`, see
  `ray/serve/_private/http_util.py`), so `create_app`'s lifespan starts the model poller and the
  micro-batcher there, and stops them when the replica shuts down.
- A replica loads the model before it reports itself started, so Serve sends a new replica
  (autoscaling, restarts) no traffic while it would still answer 503.
- Replicas on one node share `cache_dir`: loads (pull, ONNX export, parity) take a file lock,
  so the first replica pulls and exports and the others reuse its files.
- Batching stays in the replica's micro-batcher, so `max_ongoing_requests` must leave it
  requests to batch (default here 64, Serve's own default is 5).
- `/metrics` answers for the replica that took the request (each has its own registry).

Settings: each replica reads `ServingSettings` from its environment (`SERVING_*`,
`MLFLOW_TRACKING_URI`; set them in the config's `runtime_env.env_vars`), and the builder's
arguments override them. Paths (cache dir, SQLite store) should be absolute: replicas run in
other working directories.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
from typing import Any

import mlflow
from fastapi import FastAPI
from mlflow.entities.model_registry import ModelVersion
from ray import serve
from ray.serve import Application, Deployment

from pipeline.registry.pull import store_uri
from services.serving.app import create_app
from services.serving.holder import Loader
from services.serving.model import ServedModel, load
from services.serving.settings import ServingSettings
from services.serving.state import ServingState

log = logging.getLogger(__name__)

LOCK_FILE = ".load.lock"
DEPLOYMENT_OPTIONS = frozenset({"num_replicas"})


def cache_locked(loader: Loader) -> Loader:
    """`loader` under an exclusive lock on the cache dir: one load at a time per node."""

    def locked(settings: ServingSettings, version: ModelVersion, alias: str | None) -> ServedModel:
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        with (settings.cache_dir / LOCK_FILE).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                return loader(settings, version, alias)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return locked


@serve.ingress()
class ServingReplica:
    """One replica: the FastAPI app of `create_app`, its poller and micro-batcher."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        # Replica environment first, the builder's arguments over it.
        self.settings = ServingSettings(**(settings or {}))
        # The replica process serves from one store: make it MLflow's process-wide default
        # too, since `models:/` downloads resolve through `mlflow.get_registry_uri()` whatever
        # client or argument names the store (MLflow 3.17's ModelsArtifactRepository).
        uri = store_uri(self.settings.tracking_uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve in the replica after `__init__`; Serve then runs the lifespan."""
        app = create_app(self.settings, loader=cache_locked(load))
        state: ServingState = app.state.serving
        try:
            await asyncio.to_thread(state.holder.refresh)
        except Exception as error:  # noqa: BLE001 - start anyway; the poller keeps trying
            state.holder.last_error = str(error)
            log.warning("no model at replica start (%s); serving 503 until one loads", error)
        return app


# (Not a class decorator: mypy keeps a decorated class's own type.)
ServingDeployment: Deployment = serve.deployment(
    name="mnist-serving",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
)(ServingReplica)


def build_app(args: dict[str, Any]) -> Application:
    """The application: `args` are `ServingSettings` fields (strings are fine, as `serve run`
    passes them), plus `num_replicas`; unknown keys are refused."""
    args = dict(args)
    fields = set(ServingSettings.model_fields)
    unknown = sorted(set(args) - fields - DEPLOYMENT_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown}: expected ServingSettings fields {sorted(fields)} "
            f"or {sorted(DEPLOYMENT_OPTIONS)}"
        )
    options: dict[str, Any] = {key: args.pop(key) for key in DEPLOYMENT_OPTIONS & set(args)}
    if isinstance(options.get("num_replicas"), str) and options["num_replicas"].isdigit():
        options["num_replicas"] = int(options["num_replicas"])  # from `serve run ... key=value`
    # Validate the values here, before any replica starts (the replicas validate again,
    # together with their environment).
    ServingSettings.model_validate(args)
    deployment = ServingDeployment.options(**options) if options else ServingDeployment
    return deployment.bind(args)
