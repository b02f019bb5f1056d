"""One `train_model` in a fresh process, its phases and the driver's MLflow calls timed."""

import argparse
import contextlib
import functools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

STARTED = time.perf_counter()  # the heavy imports, after it, are part of what a run pays
SPANS: list[tuple[str, float, float]] = []  # (label, start, end), time.time(): MLflow's clock
MLFLOW = {"training_run (open)", "training_run (close)"}  # the labels that are MLflow's
MONITOR_CPU_S = [0.0]  # MLflow's system-metrics thread, read as the run closes


def wrap(owner: Any, attr: str, label: str, mlflow: bool = True) -> None:
    original = getattr(owner, attr)
    MLFLOW.update([label] if mlflow else [])

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            SPANS.append((label, start, time.time()))

    setattr(owner, attr, timed)


def instrument() -> None:
    import mlflow
    import ray
    from ray.train.torch import TorchTrainer

    import pipeline.training.driver as driver

    original = driver.training_run

    @contextlib.contextmanager
    def training_run(*args: Any, **kwargs: Any) -> Iterator[Any]:  # open and close apart
        start = time.time()
        with original(*args, **kwargs) as run:
            SPANS.append(("training_run (open)", start, time.time()))
            yield run
            ids = {t.native_id for t in threading.enumerate() if t.name == "SystemMetricsMonitor"}
            threads = psutil.Process().threads()
            MONITOR_CPU_S[0] = sum(t.user_time + t.system_time for t in threads if t.id in ids)
            start = time.time()
        SPANS.append(("training_run (close)", start, time.time()))

    driver.training_run = training_run
    for name in ("ensure_reachable", "log_new_epochs", "log_training_curves", "log_model"):
        wrap(driver, name, name)
    for name in ("set_tag", "set_tags", "log_metrics"):
        wrap(mlflow, name, f"mlflow.{name}")
    for owner, name in ((ray, "init"), (ray, "shutdown"), (TorchTrainer, "fit")):
        wrap(owner, name, f"{owner.__name__}.{name}", mlflow=False)


def mlflow_s() -> float:
    """Seconds covered by MLflow's spans (nested or overlapping ones count once)."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted((s, e) for name, s, e in SPANS if name in MLFLOW):
        if stop > end:
            covered, end = covered + stop - max(start, end), stop
    return covered


def from_store(uri: str, experiment: str, run_id: str, rows: list[dict[str, float]]) -> Any:
    """Each epoch's logged seconds, when the first began and the last was committed (Ray's
    controller logs an epoch once its checkpoint is); and the controller's MLflow logging
    per epoch, re-timed: the same `RunRecorder` call on a scratch run of the store."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.epochs import EPOCH_SECONDS
    from pipeline.training.recorder import RunRecorder

    client = MlflowClient(uri)
    logged = sorted(client.get_metric_history(run_id, EPOCH_SECONDS), key=lambda m: m.step)
    commits = sorted(m.timestamp / 1000 for m in client.get_metric_history(run_id, "val/accuracy"))
    seconds = [m.value for m in logged]
    first, last = commits[0] - seconds[0], commits[-1]
    epochs = {"per_epoch_s": seconds, "first_start": first, "last_end": last}
    found = client.get_experiment_by_name(experiment)
    scratch = client.create_run(found.experiment_id).info.run_id  # type: ignore[union-attr]
    recorder, costs = RunRecorder(uri, scratch, max_failures=0), []
    for row in rows:
        start = time.perf_counter()
        recorder.after_report(None, [row], checkpoint=True)
        costs.append(time.perf_counter() - start)
    client.delete_run(scratch)
    return epochs, costs


def phases(epochs: dict[str, Any], wall: float) -> dict[str, float]:
    """Where train_model's time went (bench/README.md); `other` is the rest."""
    spans = {label: (start, end) for label, start, end in SPANS}  # the last of each
    (init, up), (fit, end) = spans["ray.init"], spans["TorchTrainer.fit"]
    (down, gone), (opening, opened) = spans["ray.shutdown"], spans["training_run (open)"]
    first, last = epochs["first_start"], epochs["last_end"]
    found = {"ray start": up - init, "MLflow run open": opened - opening}
    found |= {"worker group start": first - fit, "epochs": last - first}
    found |= {"worker group end": end - last, "after training (export, log model)": down - end}
    found["ray shutdown"] = gone - down
    return found | {"other": wall - sum(found.values())}


def run(job: dict[str, Any]) -> dict[str, Any]:
    from pipeline.config.env import Settings
    from pipeline.config.params import parse_params
    from pipeline.training.driver import train_model

    imports_s, params, uri = time.perf_counter() - STARTED, parse_params(job["params"]), job["uri"]
    settings = Settings(mlflow_tracking_uri=uri, ray_address=None)
    instrument()
    called = time.time()
    outcome = train_model(params, job["model"], settings, run_name=job["name"])
    wall, run_id = time.time() - called, outcome.spec.run_id or ""
    epochs, recorder = from_store(uri, params.mlflow.experiment, run_id, outcome.history)
    calls: dict[str, float] = {}
    for label, start, end in (span for span in SPANS if span[0] in MLFLOW):
        calls[label] = calls.get(label, 0.0) + end - start
    total = mlflow_s() + sum(recorder) + MONITOR_CPU_S[0]
    mlflow = {"driver_calls_s": mlflow_s(), "driver_calls": calls, "per_epoch_logging_s": recorder}
    mlflow |= {"system_metrics_thread_cpu_s": MONITOR_CPU_S[0], "total_s": total}
    result: dict[str, Any] = {"imports_s": imports_s, "train_model_s": wall}
    result["phases_s"] = phases(epochs, wall)
    result |= {"fixed_overhead_s": wall - result["phases_s"]["epochs"], "epochs": epochs}
    result |= {"mlflow": mlflow | {"share_of_train_model": total / wall}}
    result |= {"runtime": outcome.runtime, "best_val_accuracy": outcome.spec.val_accuracy}
    if job["evaluate"]:  # then the evaluate stage
        from pipeline import evaluate

        found = evaluate.run(params, job["model"], settings)
        result["evaluation"] = {"test_accuracy": found.accuracy, "test_loss": found.loss}
    return result | {"best_epoch": outcome.spec.epoch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job", type=Path, help="JOB.json: params, model, uri, name, evaluate")
    job = parser.parse_args(argv).job
    job.with_suffix(".out.json").write_text(json.dumps(run(json.loads(job.read_text())), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
