"""The serving app on Ray Serve (`serve run services/serving/serve_config.yaml`), built in each
replica: Serve pickles a prebuilt app, and its Prometheus registry holds a lock that does not
pickle. So each replica has its own holder, batcher and metrics (`/metrics` answers for one),
and reads `ServingSettings` from its environment, the builder's arguments over it; paths should
be absolute (replicas run in other directories)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import mlflow
from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment

from pipeline.registry.pull import store_uri
from services.serving.app import create_app
from services.serving.routes import ServingState
from services.serving.settings import ServingSettings

log = logging.getLogger(__name__)


@serve.ingress()
class ServingReplica:
    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = ServingSettings(**(settings or {}))  # over the replica's environment
        # The replica process serves from one store: make it MLflow's process-wide default
        # too, since `models:/` downloads resolve through `mlflow.get_registry_uri()` whatever
        # client or argument names the store (MLflow 3.17's ModelsArtifactRepository).
        uri = store_uri(self.settings.tracking_uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """The app, with its model loaded: Serve sends a replica no traffic until this returns,
        so a new replica (autoscaling, a restart) does not answer 503 meanwhile."""
        app = create_app(self.settings)
        state: ServingState = app.state.serving
        try:
            await asyncio.to_thread(state.holder.refresh)
        except Exception as error:  # noqa: BLE001 - start anyway; the poller keeps trying
            state.holder.last_error = str(error)
            log.warning("no model at replica start (%s); serving 503 until one loads", error)
        return app


# Not a class decorator: mypy keeps a decorated class's own type. The micro-batcher needs
# requests in flight to batch: Serve's default max_ongoing_requests is 5.
ServingDeployment: Deployment = serve.deployment(
    name="mnist-serving", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}
)(ServingReplica)


def build_app(args: dict[str, Any]) -> Application:
    """The application: `args` are `ServingSettings` fields (strings are fine, as `serve run`
    passes them), plus `num_replicas`; unknown keys are refused."""
    settings = {key: value for key, value in args.items() if key != "num_replicas"}
    fields = sorted(ServingSettings.model_fields)
    if unknown := sorted(set(settings) - set(fields)):
        raise ValueError(
            f"unknown argument(s) {unknown}: expected ServingSettings fields {fields} "
            "or ['num_replicas']"
        )
    ServingSettings.model_validate(settings)  # now, not in each replica as it starts
    if "num_replicas" not in args:
        return ServingDeployment.bind(settings)
    replicas = args["num_replicas"]
    if isinstance(replicas, str) and replicas.isdigit():  # from `serve run ... num_replicas=2`
        replicas = int(replicas)
    return ServingDeployment.options(num_replicas=replicas).bind(settings)
