"""Register stage: every trained candidate becomes a version; the best is gated to champion."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from pipeline.config.base import MODEL_NAMES, ModelName
from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.data.atomic import write_json
from pipeline.data.prepared import open_prepared
from pipeline.models.artifact import load_model
from pipeline.registry.versions import Candidate, Decision, decide_and_promote
from pipeline.tracking.manifest import MANIFEST_TAG
from pipeline.tracking.runs import ensure_reachable, tracking_uri

REPORT = "registry.json"


def candidates(
    params: Params, client: MlflowClient, models: Sequence[ModelName] = MODEL_NAMES
) -> list[Candidate]:
    """One candidate per trained and evaluated model, with its run's lineage tags."""
    found = []
    for name in models:
        _, spec = load_model(Path(params.paths.models) / name)
        if spec.run_id is None:
            raise ValueError(f"models/{name} was trained without MLflow tracking: retrain it")
        test = json.loads((Path(params.paths.metrics) / f"{name}.json").read_text())["test"]
        tags = client.get_run(spec.run_id).data.tags
        lineage = {
            "git_commit": tags.get("git_commit", "unknown"),
            "data_digest": spec.data_digest,
            MANIFEST_TAG: tags.get(MANIFEST_TAG, "{}"),
        }
        accuracy, loss = float(test["accuracy"]), float(test["loss"])
        found.append(Candidate(name, spec.run_id, tags["model_uri"], accuracy, loss, lineage))
    return found


def run(params: Params, settings: Settings, models: Sequence[ModelName] = MODEL_NAMES) -> Decision:
    uri = tracking_uri(settings)
    ensure_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    test = open_prepared(Path(params.paths.prepared)).load("test")
    images = test.images.astype(np.float32) / 255.0  # the model input contract

    def score_on_test(model_uri: str) -> float:
        probabilities = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images))
        return float((probabilities.argmax(axis=1) == test.labels).mean())

    found, margin = candidates(params, client, models), params.register_.min_improvement
    name = params.mlflow.registered_model
    decision = decide_and_promote(client, name, found, margin, score_on_test)
    write_json(Path(params.paths.reports) / REPORT, asdict(decision))
    return decision
