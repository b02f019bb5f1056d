"""Evaluate stage: test-set loss and accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.config.base import ModelName
from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.data.atomic import write_json, write_text
from pipeline.data.prepared import CLASSES, SplitArrays, open_prepared
from pipeline.models.artifact import load_model
from pipeline.models.module import to_unit_float
from pipeline.tracking.figures import confusion_figure, misclassified_figure
from pipeline.tracking.runs import TrackingError, ensure_reachable, tracking_uri


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion: np.ndarray  # (true, predicted) counts
    predictions: np.ndarray  # predicted digit per test image

    def metrics(self) -> dict[str, object]:
        test = {"accuracy": round(self.accuracy, 6), "loss": round(self.loss, 6)}
        per_class = {k: round(v, 6) for k, v in self.per_class_accuracy.items()}
        return {"test": test | {"per_class_accuracy": per_class}}


@torch.no_grad()
def predict_proba(net: nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    net.eval()
    outputs = [
        F.softmax(net(to_unit_float(torch.from_numpy(images[i : i + batch_size]))), dim=1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs).numpy()


def evaluate(net: nn.Module, test: SplitArrays, batch_size: int = 1000) -> Evaluation:
    probabilities = predict_proba(net, test.images, batch_size)
    labels = test.labels.astype(np.int64)
    predictions = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = {
        digit: float(confusion[i, i] / support[i]) if support[i] else float("nan")
        for i, digit in enumerate(CLASSES)
    }
    accuracy = float((predictions == labels).mean())
    return Evaluation(loss, accuracy, per_class, confusion, predictions)


def log_evaluation(
    uri: str, run_id: str, evaluation: Evaluation, test: SplitArrays, grid_size: int
) -> None:
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException as error:
        raise TrackingError(f"MLflow run {run_id} not found at {uri}: {error.message}") from None
    now = int(time.time() * 1000)
    metrics = {"test/accuracy": evaluation.accuracy, "test/loss": evaluation.loss} | {
        f"test/accuracy_{digit}": value for digit, value in evaluation.per_class_accuracy.items()
    }
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    per_class, support = evaluation.per_class_accuracy, evaluation.confusion.sum(axis=1).tolist()
    table = {"digit": list(per_class), "accuracy": list(per_class.values()), "support": support}
    client.log_table(run_id, data=table, artifact_file="evaluation/per_class_accuracy.json")
    confusion = confusion_figure(evaluation.confusion, "test confusion matrix")
    wrong = misclassified_figure(test.images, test.labels, evaluation.predictions, grid_size)
    for path, figure in {"confusion_matrix.png": confusion, "misclassified.png": wrong}.items():
        client.log_figure(run_id, figure, f"evaluation/{path}")
        plt.close(figure)


def run(params: Params, name: ModelName, settings: Settings) -> Evaluation:
    """The stage: score `models/<name>` on the test split; metrics and the confusion plot also
    into the MLflow run that trained it."""
    net, spec = load_model(Path(params.paths.models) / name)
    uri = tracking_uri(settings)
    if spec.run_id:
        ensure_reachable(uri)
    test = open_prepared(Path(params.paths.prepared)).load("test")
    result = evaluate(net, test, params.evaluate.batch_size)
    if spec.run_id:
        log_evaluation(uri, spec.run_id, result, test, params.evaluate.misclassified_grid)
    write_json(Path(params.paths.metrics) / f"{name}.json", result.metrics())
    # One row per test image: what DVC's confusion template reads.
    pairs = zip(test.labels.tolist(), result.predictions.tolist(), strict=True)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("actual", "predicted"), *pairs])
    write_text(Path(params.paths.plots) / name / "confusion.csv", buffer.getvalue())
    return result
