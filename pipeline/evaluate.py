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
        """What `metrics/<name>.json` holds."""
        return {
            "test": {
                "accuracy": round(self.accuracy, 6),
                "loss": round(self.loss, 6),
                "per_class_accuracy": {k: round(v, 6) for k, v in self.per_class_accuracy.items()},
            }
        }


@torch.no_grad()
def predict_proba(net: nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities for uint8 images (N, 28, 28)."""
    net.eval()
    outputs = [
        F.softmax(net(to_unit_float(torch.from_numpy(images[i : i + batch_size]))), dim=1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs).numpy()


def evaluate(net: nn.Module, test: SplitArrays, batch_size: int = 1000) -> Evaluation:
    """Score `net` on `test`."""
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


def confusion_csv(labels: np.ndarray, predictions: np.ndarray) -> str:
    """One row per test image, the form DVC's confusion template reads."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["actual", "predicted"])
    writer.writerows(zip(labels.tolist(), predictions.tolist(), strict=True))
    return buffer.getvalue()


def log_evaluation(
    uri: str, run_id: str, evaluation: Evaluation, test: SplitArrays, grid_size: int
) -> None:
    """Test metrics and evaluation figures into the run that trained the model."""
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
    client.log_table(
        run_id,
        data={
            "digit": list(evaluation.per_class_accuracy),
            "accuracy": list(evaluation.per_class_accuracy.values()),
            "support": evaluation.confusion.sum(axis=1).tolist(),
        },
        artifact_file="evaluation/per_class_accuracy.json",
    )
    figures = {
        "confusion_matrix.png": confusion_figure(evaluation.confusion, "test confusion matrix"),
        "misclassified.png": misclassified_figure(
            test.images, test.labels, evaluation.predictions, grid_size
        ),
    }
    for path, figure in figures.items():
        client.log_figure(run_id, figure, f"evaluation/{path}")
        plt.close(figure)


def run(params: Params, name: ModelName, settings: Settings) -> Evaluation:
    """The stage: score `models/<name>` on the test split; write metrics and the confusion plot,
    and log both into the MLflow run that trained the model."""
    net, spec = load_model(Path(params.paths.models) / name)
    uri = tracking_uri(settings)
    if spec.run_id:
        ensure_reachable(uri)
    test = open_prepared(Path(params.paths.prepared)).load("test")
    result = evaluate(net, test, params.evaluate.batch_size)
    if spec.run_id:
        log_evaluation(uri, spec.run_id, result, test, params.evaluate.misclassified_grid)
    write_json(Path(params.paths.metrics) / f"{name}.json", result.metrics())
    write_text(
        Path(params.paths.plots) / name / "confusion.csv",
        confusion_csv(test.labels, result.predictions),
    )
    return result
