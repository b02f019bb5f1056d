"""The Ray Serve config and the deployment builder's argument checks (no Serve started)."""

from __future__ import annotations

import importlib

import pytest
import yaml

from tests.conftest import REPO

CONFIG = REPO / "services" / "serving" / "serve_config.yaml"


def test_serve_config_validates_and_imports() -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from services.serving.ray_app import ServingDeployment, build_app
    from services.serving.settings import ServingSettings

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (application,) = config.applications
    assert application.route_prefix == "/"
    module, _, attribute = application.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attribute)
    assert builder is build_app
    assert callable(builder)
    assert isinstance(builder(application.args or {}), Application)
    (deployment,) = application.deployments
    assert deployment.name == ServingDeployment.name
    autoscaling = dict(deployment.autoscaling_config)
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 4)
    env = application.runtime_env["env_vars"]
    assert all(key.startswith(("SERVING_", "MLFLOW_")) for key in env)
    # Every SERVING_ variable names a setting, and its value validates.
    fields = {f"SERVING_{name.upper()}" for name in ServingSettings.model_fields}
    assert set(env) - {"MLFLOW_TRACKING_URI"} <= fields
    ServingSettings.model_validate({k.removeprefix("SERVING_").lower(): v for k, v in env.items()})


def test_builder_refuses_unknown_and_invalid_arguments() -> None:
    from services.serving.ray_app import build_app

    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"modle_uri": "models:/x@champion"})
    with pytest.raises(ValueError, match="poll_interval_s"):
        build_app({"poll_interval_s": "-1"})
    build_app({"num_replicas": "2", "batch_max_wait_ms": "1"})  # strings, as `serve run` passes
