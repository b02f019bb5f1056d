"""Pipeline benchmark: DVC's no-op `repro` and `status`, MLflow's share of a training."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench import common
from bench.report import header, table, target, write

BIN = Path(sys.executable).parent
TARGET_NOOP_S = 3.0
TARGET_MLFLOW_SHARE = 0.02
# Real MNIST, every stage as it is, in seconds rather than minutes.
SMALL_PROFILE = {"prepare.train_limit": 2500, "prepare.val_size": 500, "prepare.test_limit": 1000}
SMALL_PROFILE |= {"train.mlp.epochs": 2, "train.cnn.epochs": 2}
# The stages `dvc repro` runs: a bare `dvc status` also lists the optional tune stages.
COMMANDS = {"`dvc repro`, nothing changed": ["repro"], "`dvc status`": ["status", "dvc.yaml"]}
DVC = "command={command} | median s={median:.2f} | all runs (s)={runs}"
MLFLOW = (
    "model={model} | epochs={epochs:d} | workers x CPUs={scaling} | train_model s="
    "{train_model_s:.1f} | MLflow s={total_s:.2f} | share={share_of_train_model:.2%} | driver "
    "calls s={driver_calls_s:.2f} | per-epoch logging s={logging_s:.2f} | system metrics CPU s="
    "{system_metrics_thread_cpu_s:.2f} | other CPU={other_cpu_pct:.0f}%"
)


def dvc(repo: Path, args: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([BIN / "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo}:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - start, done.stdout + done.stderr


def measure_dvc(workdir: Path, repeats: int) -> dict[str, Any]:
    from pipeline.config.params import with_overrides
    from testkit.data import mirror_folder, raw_params
    from testkit.processes import copy_repo

    repo = workdir / "repo"
    repo.mkdir(parents=True)
    copy_repo(repo)
    raw = with_overrides(raw_params(), SMALL_PROFILE)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PATH": f"{BIN}{os.pathsep}{env['PATH']}", "MNIST_MIRROR": str(mirror_folder())}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    common.log(f"dvc repro (small profile) in {repo} ...")
    dvc(repo, ["repro"], env)
    runs: dict[str, list[float]] = {label: [] for label in COMMANDS}
    meter = common.CpuMeter(sample_s=0.25)
    for label, args in (item for _ in range(repeats) for item in COMMANDS.items()):
        seconds, out = dvc(repo, args, env)
        if "Running stage" in out or (args[0] == "status" and "up to date" not in out):
            raise RuntimeError(f"dvc {args[0]} after a repro is not a no-op:\n{out}")
        runs[label].append(round(seconds, 2))
    rows = [{"command": k, "median": statistics.median(v), "runs": v} for k, v in runs.items()]
    return {"model": "dvc", "rows": rows, "other_cpu_pct": meter.stop().other_pct}


def mlflow_share(name: str, workdir: Path, prepared: Path, epochs: int | None) -> dict[str, Any]:
    overrides = {f"train.{name}.epochs": epochs} if epochs else {}
    params = common.scratch_params(workdir / name, overrides, prepared)
    common.log(f"{name}: train_model with MLflow calls timed ...")
    result, meter = common.train_fresh(params, name, workdir / name, f"bench-{name}")
    scaling, mlflow = params.train.scaling, result["mlflow"]
    found = {"model": name, "epochs": params.train.model(name).epochs}
    found |= {"scaling": f"{scaling.num_workers}x{scaling.cpus_per_worker}"}
    found |= {"train_model_s": result["train_model_s"], "other_cpu_pct": meter.other_pct}
    return found | mlflow | {"logging_s": sum(mlflow["per_epoch_logging_s"])}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each dvc command (5)")
    parser.add_argument("--models", default="mlp,cnn", help="MLflow's share of these ('': none)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: params.yaml's)")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--quick", action="store_true", help="MLflow's share on 1 epoch of 5,000")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = args.epochs or 1, args.limit or 5000
        args.repeats = min(args.repeats, 3)
    report, workdir = common.begin("pipeline", args, argv)
    report["dvc"] = measure_dvc(workdir, args.repeats)
    models = [m for m in args.models.split(",") if m]
    prepared = common.prepared_data(workdir, args.limit) if models else workdir
    report["mlflow"] = [mlflow_share(name, workdir, prepared, args.epochs) for name in models]
    noop, what = report["dvc"]["rows"][0]["median"], f"no-op `dvc repro` <= {TARGET_NOOP_S:g} s"
    report["targets"] = [target(what, f"median {noop:.2f} s", noop <= TARGET_NOOP_S, noop)]
    for row in report["mlflow"]:
        logged, share = row["driver_calls"].get("log_model", 0.0), row["share_of_train_model"]
        rest = (row["total_s"] - logged) / row["train_model_s"]
        measured = f"{row['total_s']:.2f} s of {row['train_model_s']:.1f} s = {share:.2%}; "
        measured += f"of it `log_model` {logged:.2f} s, the rest {rest:.2%}"
        what = f"{row['model']}: MLflow logging <= {TARGET_MLFLOW_SHARE:.0%} of training time"
        report["targets"].append(target(what, measured, share <= TARGET_MLFLOW_SHARE, share))
    report["notes"] = common.disturbed([report["dvc"], *report["mlflow"]], "model")
    title = "Pipeline benchmark: DVC's no-op cost and MLflow's share of training"
    parts = [header(title, "bench.pipeline", report), f"DVC, in a repo copy, {SMALL_PROFILE}:\n"]
    parts += [*table(report["dvc"]["rows"], DVC), "MLflow's share of `train_model`:\n"]
    name = "pipeline-quick" if args.quick else "pipeline"
    write(name, report, parts + table(report["mlflow"], MLFLOW), args.out_dir)
    common.finish(args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
