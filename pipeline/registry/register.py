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
        run = client.get_run(spec.run_id)
        found.append(
            Candidate(
                model_type=name,
                run_id=spec.run_id,
                model_uri=run.data.tags["model_uri"],
                test_accuracy=float(test["accuracy"]),
                test_loss=float(test["loss"]),
                tags={
                    "git_commit": run.data.tags.get("git_commit", "unknown"),
                    "data_digest": spec.data_digest,
                    MANIFEST_TAG: run.data.tags.get(MANIFEST_TAG, "{}"),
                },
            )
        )
    return found


def _test_set(params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Test images in the model input contract, and their labels."""
    test = open_prepared(Path(params.paths.prepared)).load("test")
    return test.images.astype(np.float32) / 255.0, test.labels


def run(params: Params, settings: Settings, models: Sequence[ModelName] = MODEL_NAMES) -> Decision:
    """The stage: register `models`, alias, gate; write `reports/registry.json`."""
    uri = tracking_uri(settings)
    ensure_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    images, labels = _test_set(params)

    def score_on_test(model_uri: str) -> float:
        model = mlflow.pyfunc.load_model(model_uri)
        probabilities = np.asarray(model.predict(images))
        return float((probabilities.argmax(axis=1) == labels).mean())

    decision = decide_and_promote(
        client,
        params.mlflow.registered_model,
        candidates(params, client, models),
        params.register_.min_improvement,
        score_on_test,
    )
    write_json(Path(params.paths.reports) / REPORT, asdict(decision))
    return decision
