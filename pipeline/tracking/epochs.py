"""A run's per-epoch metrics and restart count; light on purpose: Ray Train's controller
imports it before the workers start (bench/README.md, fixed overhead), and the workers, which
need only the metric names, do not import MLflow at all."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

RESTARTS_TAG = "ray.restarts"
EPOCH_METRICS = ("train/loss", "val/loss", "val/accuracy")
EPOCH_SECONDS = "time/epoch_s"  # training + validation seconds of the epoch


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    """The epochs the run has metrics for (all of `EPOCH_METRICS` go in one batch)."""
    return {metric.step for metric in client.get_metric_history(run_id, "val/accuracy")}


def logged_history(client: MlflowClient, run_id: str) -> list[dict[str, float]]:
    """The run's per-epoch metrics as rows (`epoch` = step), in order; reads every history."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for metric in client.get_metric_history(run_id, key):
            by_epoch.setdefault(metric.step, {"epoch": float(metric.step)})[key] = metric.value
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def log_new_epochs(client: MlflowClient, run_id: str, rows: list[dict[str, float]]) -> None:
    """Each row's metrics at step = its epoch, but for epochs the run has: no step twice."""
    from mlflow.entities import Metric  # here: the workers import this module, not MLflow

    done = logged_epochs(client, run_id)
    now = int(time.time() * 1000)
    keys = (*EPOCH_METRICS, EPOCH_SECONDS)
    new = [row for row in rows if int(row["epoch"]) not in done]
    metrics = [Metric(k, float(r[k]), now, int(r["epoch"])) for r in new for k in keys if k in r]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def count_restart(client: MlflowClient, run_id: str) -> None:
    """Add one to the run's restart count (a tag: it survives driver resumes)."""
    count = int(client.get_run(run_id).data.tags.get(RESTARTS_TAG, "0")) + 1
    client.set_tag(run_id, RESTARTS_TAG, str(count))
