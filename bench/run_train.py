"""One `train_model` call in a fresh process, as `mnist-pipeline train` runs it, with its
phases and every MLflow call of the driver timed. Writes one JSON file.

    .venv/bin/python bench/run_train.py --params p.yaml --model cnn --tracking-uri \\
        sqlite:////tmp/x/mlflow.db --out result.json [--evaluate]

Used by bench/training.py (the Ray rows), bench/pipeline.py (MLflow's share) and
bench/accuracy.py (one seed). A fresh process per run, so that each run pays what a user's
`mnist-pipeline train` pays (imports, a new local Ray) and inherits nothing from the last.

Nothing here changes what train_model does: the wrappers only note when a call starts and
ends. The MLflow share counts: the driver's MLflow calls (opening the run, which also hashes
the data for its lineage, the tags, the final metrics, the curves figure, the logged model),
the CPU time of MLflow's system-metrics thread, and the per-epoch logging that Ray Train's
controller does in another process (re-timed here with the same `RunRecorder` on a scratch run
of the same store, once per epoch).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: they are part of what a run pays

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Not this script's folder: Ray puts the driver's script folder on every worker's path, where
# bench/pipeline.py would shadow the project's `pipeline` package. The repo instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import mlflow  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import pipeline.training.driver as train  # noqa: E402
from pipeline.config.env import Settings  # noqa: E402
from pipeline.config.params import load_params  # noqa: E402
from pipeline.tracking.epochs import EPOCH_SECONDS  # noqa: E402

IMPORTED = time.perf_counter()

# What each wrapped call is charged to. `mlflow` spans add up to MLflow's share.
MLFLOW = "mlflow"
RAY = "ray"
EXPORT = "export"


@dataclass
class Timeline:
    """Spans (label, kind, start, end) in `time.time()` seconds: MLflow's metric timestamps
    are wall-clock too, so driver calls and epoch commits line up (same machine)."""

    spans: list[tuple[str, str, float, float]] = field(default_factory=list)
    monitor_cpu_s: float = 0.0

    def wrap(self, owner: Any, attr: str, kind: str, label: str | None = None) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                self.spans.append((label or attr, kind, start, time.time()))

        setattr(owner, attr, timed)

    def wrap_context(self, owner: Any, attr: str, kind: str) -> None:
        """A context manager factory: its opening and its closing are separate spans."""
        original = getattr(owner, attr)
        timeline = self

        class Timed:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.inner = original(*args, **kwargs)

            def __enter__(self) -> Any:
                start = time.time()
                value = self.inner.__enter__()
                timeline.spans.append((f"{attr} (open)", kind, start, time.time()))
                return value

            def __exit__(self, *exc: Any) -> Any:
                # The system-metrics thread stops with the run: read its CPU time first.
                timeline.monitor_cpu_s = _thread_cpu_s("SystemMetricsMonitor")
                start = time.time()
                try:
                    return self.inner.__exit__(*exc)
                finally:
                    timeline.spans.append((f"{attr} (close)", kind, start, time.time()))

        setattr(owner, attr, Timed)

    def total(self, kind: str, within: tuple[float, float] | None = None) -> float:
        """Seconds covered by spans of `kind` (nested or overlapping spans count once)."""
        intervals = sorted((s, e) for _, k, s, e in self.spans if k == kind)
        if within:
            lo, hi = within
            intervals = [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]
        covered, end = 0.0, float("-inf")
        for start, stop in intervals:
            if stop <= end:
                continue
            covered += stop - max(start, end)
            end = stop
        return covered

    def span(self, label: str) -> tuple[float, float] | None:
        found = [(s, e) for name, _, s, e in self.spans if name == label]
        return found[-1] if found else None


def _thread_cpu_s(name: str) -> float:
    """CPU seconds used so far by the Python thread called `name` (0 when there is none)."""
    ids = {t.native_id for t in threading.enumerate() if t.name == name}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def instrument() -> Timeline:
    timeline = Timeline()
    timeline.wrap(train, "ensure_reachable", MLFLOW)
    timeline.wrap_context(train, "training_run", MLFLOW)
    timeline.wrap(train, "log_new_epochs", MLFLOW)
    timeline.wrap(train, "log_training_curves", MLFLOW)
    timeline.wrap(train, "log_model", MLFLOW)
    for name in ("set_tag", "set_tags", "log_metrics"):
        timeline.wrap(mlflow, name, MLFLOW, f"mlflow.{name}")
    timeline.wrap(ray, "init", RAY, "ray.init")
    timeline.wrap(ray, "shutdown", RAY, "ray.shutdown")
    timeline.wrap(train, "check_storage", RAY)
    timeline.wrap(train, "_fit", RAY, "TorchTrainer.fit")
    timeline.wrap(train, "_best_network", RAY)
    timeline.wrap(train, "save_model", EXPORT)
    return timeline


def epoch_times(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Per-epoch seconds as the run logged them (`time/epoch_s`: training + validation of the
    slowest rank), and when the first epoch began and the last was committed: Ray's controller
    logs each epoch's metrics once its checkpoint is committed (MLflow's timestamps)."""
    seconds = client.get_metric_history(run_id, EPOCH_SECONDS)
    commits = client.get_metric_history(run_id, "val/accuracy")
    if not seconds or not commits:
        return {}
    per_epoch = [m.value for m in sorted(seconds, key=lambda m: m.step)]
    first = min(commits, key=lambda m: m.step)
    return {
        "per_epoch_s": per_epoch,
        "first_start": first.timestamp / 1000 - per_epoch[0],
        "last_end": max(m.timestamp for m in commits) / 1000,
    }


def commit_times(uri: str, run_id: str) -> list[float]:
    """When Ray's controller logged each epoch (MLflow's metric timestamps, in seconds)."""
    history = MlflowClient(uri).get_metric_history(run_id, "val/accuracy")
    return [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]


def recorder_cost(uri: str, experiment: str, rows: list[dict[str, float]]) -> list[float]:
    """Seconds per epoch of the controller's MLflow logging: the same `RunRecorder` call on a
    scratch run of the same store, once per epoch row (the scratch run is deleted after)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise RuntimeError(f"experiment {experiment!r} not in {uri}")
    run = client.create_run(found.experiment_id, run_name="bench-recorder-cost")
    recorder = train.RunRecorder(uri, run.info.run_id, max_failures=0)
    costs = []
    try:
        for row in rows:
            start = time.perf_counter()
            recorder.after_report(None, [row], checkpoint=True)
            costs.append(time.perf_counter() - start)
    finally:
        client.delete_run(run.info.run_id)
    return costs


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = load_params(args.params)
    settings = Settings(mlflow_tracking_uri=args.tracking_uri, ray_address=None)
    timeline = instrument()
    called = time.time()
    outcome = train.train_model(params, args.model, settings, run_name=args.run_name)
    returned = time.time()
    wall = returned - called
    fit = timeline.span("TorchTrainer.fit")
    ray_init = timeline.span("ray.init")
    shutdown = timeline.span("ray.shutdown")
    if not (fit and ray_init and shutdown):
        raise RuntimeError(f"train_model ran without its usual phases: {timeline.spans}")
    run_id = outcome.spec.run_id or ""
    epochs = epoch_times(MlflowClient(args.tracking_uri), run_id)
    recorder = recorder_cost(args.tracking_uri, params.mlflow.experiment, outcome.history)
    driver_mlflow = timeline.total(MLFLOW)
    mlflow_s = driver_mlflow + sum(recorder) + timeline.monitor_cpu_s
    phases: dict[str, float] = {
        "ray start (ray.init)": ray_init[1] - ray_init[0],
    }
    opened = timeline.span("training_run (open)")
    if opened:
        phases["MLflow run open (params, tags, data lineage hash)"] = opened[1] - opened[0]
    if epochs:
        phases |= {
            "worker group start (controller, workers, process group, data, Trainer setup)": (
                epochs["first_start"] - fit[0]
            ),
            "epochs": epochs["last_end"] - epochs["first_start"],
            "worker group end (last report, shutdown)": fit[1] - epochs["last_end"],
        }
    else:
        phases["TorchTrainer.fit"] = fit[1] - fit[0]
    phases |= {
        "after training: best checkpoint, export, log model": shutdown[0] - fit[1],
        "ray shutdown": shutdown[1] - shutdown[0],
    }
    phases["other"] = wall - sum(phases.values())
    evaluation: dict[str, Any] = {}
    if args.evaluate:
        from pipeline import evaluate

        result = evaluate.run(params, args.model, settings)
        evaluation = {"test_accuracy": result.accuracy, "test_loss": result.loss}
    return {
        "model": args.model,
        "run_name": args.run_name,
        "run_id": run_id,
        "imports_s": IMPORTED - STARTED,
        "train_model_s": wall,
        "called": called,
        "returned": returned,
        "phases_s": phases,
        "fixed_overhead_s": wall - (epochs["last_end"] - epochs["first_start"]) if epochs else None,
        "epochs": epochs,
        "commit_times": commit_times(args.tracking_uri, run_id),
        "mlflow": {
            "driver_calls_s": driver_mlflow,
            "driver_calls": _by_label(timeline, MLFLOW),
            "per_epoch_logging_s": recorder,
            "system_metrics_thread_cpu_s": timeline.monitor_cpu_s,
            "total_s": mlflow_s,
            "share_of_train_model": mlflow_s / wall,
        },
        "history": outcome.history,
        "runtime": outcome.runtime,
        "best_epoch": outcome.spec.epoch,
        "best_val_accuracy": outcome.spec.val_accuracy,
        "evaluation": evaluation,
    }


def _by_label(timeline: Timeline, kind: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for label, k, start, end in timeline.spans:
        if k == kind:
            totals[label] = totals.get(label, 0.0) + end - start
    return {k: round(v, 3) for k, v in totals.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, required=True, help="a complete params file")
    parser.add_argument("--model", choices=("mlp", "cnn"), required=True)
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:////abs/mlflow.db")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--out", type=Path, required=True, help="the JSON result")
    parser.add_argument("--evaluate", action="store_true", help="then the evaluate stage")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
