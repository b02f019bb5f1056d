"""Pipeline benchmark: `dvc repro` with nothing changed, `dvc status`, and MLflow's share of
a training run.

    .venv/bin/python bench/pipeline.py            # small-profile repro in a temp copy, then
                                                  # MLflow's share on the default training
    .venv/bin/python bench/pipeline.py --quick    # same, MLflow's share on 1 epoch of 5,000
    .venv/bin/python bench/pipeline.py --help

1. **DVC**: copies the repo's tracked and untracked-but-not-ignored files into a temporary
   folder (a fresh clone's view, with a new git repo), sets a small profile in its params.yaml
   (2,500 training images, 2 epochs per model: the stages run for real, quickly), runs
   `dvc repro` once to fill it (timed too), then times `dvc repro` with nothing changed and
   `dvc status dvc.yaml` (the stages `dvc repro` runs), several times each. A no-op repro
   that runs any stage is an error.
   `--in-repo` times them in this checkout instead, and only when `dvc status` finds it up to
   date (a repro there would otherwise train for minutes and rewrite models/ and mlflow.db).
2. **MLflow**: `train_model` on the default params (full data, default epochs and scaling),
   one fresh process per model (bench/run_train.py, as `mnist-pipeline train` runs), with every
   MLflow call of the driver timed, the system-metrics thread's CPU, and the per-epoch logging
   of Ray Train's controller (re-timed with the same code on a scratch run of the same store).
   Share = that total over `train_model`'s wall time.

Writes bench/results/pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # `common`; the repo goes first

import common  # noqa: E402
import yaml  # noqa: E402

from pipeline.config.params import with_overrides  # noqa: E402
from testkit.processes import copy_repo  # noqa: E402

REPO = common.REPO
BIN = Path(sys.executable).parent
TARGET_NOOP_S = 3.0
TARGET_MLFLOW_SHARE = 0.02
# Real MNIST, the stages as they are, in seconds rather than minutes.
SMALL_PROFILE = {
    "prepare.train_limit": 2500,
    "prepare.val_size": 500,
    "prepare.test_limit": 1000,
    "train.mlp.epochs": 2,
    "train.cnn.epochs": 2,
}


# --------------------------------------------------------------------------- DVC


def dvc_env(mlflow_uri: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MNIST_MIRROR"] = common.mirror_folder()
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


def timed_dvc(repo: Path, args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds of one `dvc <args>` as a user types it (the venv's console script)."""
    start = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo}:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def measure_dvc(repo: Path, env: dict[str, str], repeats: int) -> dict[str, Any]:
    """No-op `dvc repro` and `dvc status`, `repeats` times each, alternating."""
    repro: list[float] = []
    status: list[float] = []
    with common.cpu_share() as share:
        for _ in range(repeats):
            seconds, out = timed_dvc(repo, ["repro"], env)
            if "Running stage" in out:
                raise RuntimeError(f"a no-op `dvc repro` ran stages:\n{out}")
            repro.append(seconds)
            # The pipeline's stages, those `dvc repro` runs: a bare `dvc status` also lists
            # the optional tune stages (tune/dvc.yaml) as changed until a search has run.
            seconds, out = timed_dvc(repo, ["status", "dvc.yaml"], env)
            if "up to date" not in out:
                raise RuntimeError(f"`dvc status` after a repro is not clean:\n{out}")
            status.append(seconds)
    return {
        "repro_noop_s": repro,
        "status_s": status,
        "repro_noop_median_s": statistics.median(repro),
        "status_median_s": statistics.median(status),
        "other_cpu_pct": share.other_pct,
    }


def dvc_in_copy(workdir: Path, repeats: int) -> dict[str, Any]:
    repo = workdir / "repo"
    repo.mkdir(parents=True)
    copy_repo(repo)
    raw = with_overrides(common.repo_params_raw(), SMALL_PROFILE)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = dvc_env(f"sqlite:///{repo / 'mlflow.db'}")
    common.log(f"dvc repro (small profile) in {repo} ...")
    with common.cpu_share() as share:
        first_s, out = timed_dvc(repo, ["repro"], env)
    stages = out.count("Running stage")
    common.log(f"first dvc repro: {first_s:.1f} s, {stages} stages")
    measured = measure_dvc(repo, env, repeats)
    return {
        "where": "a temporary copy of the repo after a small-profile `dvc repro` "
        f"({', '.join(f'{k}={v}' for k, v in SMALL_PROFILE.items())})",
        "first_repro_s": first_s,
        "first_repro_stages": stages,
        "first_repro_other_cpu_pct": share.other_pct,
    } | measured


def dvc_in_repo(repeats: int) -> dict[str, Any]:
    env = dvc_env(None)
    _, out = timed_dvc(REPO, ["status", "dvc.yaml"], env)
    if "up to date" not in out:
        raise SystemExit(
            "--in-repo: `dvc status` finds changes in this checkout, so `dvc repro` would run "
            f"stages; run the pipeline first (make run) or leave out --in-repo.\n{out}"
        )
    return {"where": f"this checkout ({REPO}), after a full run"} | measure_dvc(REPO, env, repeats)


# --------------------------------------------------------------------------- MLflow


def mlflow_share(
    name: str, workdir: Path, prepared: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """One `train_model` of `name` in a fresh process, its MLflow calls timed."""
    folder = workdir / f"mlflow-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    params = common.scratch_params(folder, overrides, prepared=prepared)
    params_file, out, log_file = (folder / "params.yaml", folder / "result.json", folder / "log")
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    common.init_store(uri, params.mlflow.experiment)
    command = [
        sys.executable, str(REPO / "bench" / "run_train.py"), "--params", str(params_file),
        "--model", name, "--tracking-uri", uri, "--run-name", f"bench-{name}", "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    common.log(f"{name}: train_model with MLflow calls timed ...")
    with log_file.open("wb") as sink, common.cpu_share() as share:
        done = subprocess.run(command, cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"training {name} failed, log {log_file}:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    scaling = params.train.scaling
    found = {
        "model": name,
        "epochs": params.train.model(name).epochs,
        "scaling": f"{scaling.num_workers}x{scaling.cpus_per_worker}",
        "train_model_s": result["train_model_s"],
        "process_s": share.wall_s,
        "imports_s": result["imports_s"],
        "other_cpu_pct": share.other_pct,
        "best_val_accuracy": result["best_val_accuracy"],
    } | result["mlflow"]
    common.log(
        f"{name}: MLflow {found['total_s']:.2f} s of {found['train_model_s']:.1f} s = "
        f"{found['share_of_train_model']:.2%}"
    )
    return found


# --------------------------------------------------------------------------- report


def evaluate_targets(dvc: dict[str, Any], mlflow: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = [
        {
            "target": f"`dvc repro` with nothing changed <= {TARGET_NOOP_S:g} s",
            "measured": f"median {dvc['repro_noop_median_s']:.2f} s of "
            f"{len(dvc['repro_noop_s'])} ({dvc['where']})",
            "value": dvc["repro_noop_median_s"],
            "holds": dvc["repro_noop_median_s"] <= TARGET_NOOP_S,
        }
    ]
    for row in mlflow:
        logged_model = row["driver_calls"].get("log_model", 0.0)
        rest = (row["total_s"] - logged_model) / row["train_model_s"]
        targets.append(
            {
                "target": f"{row['model']}: MLflow logging <= {TARGET_MLFLOW_SHARE:.0%} of "
                "training time",
                "measured": f"{row['total_s']:.2f} s of {row['train_model_s']:.1f} s = "
                f"{row['share_of_train_model']:.2%} ({row['epochs']} epochs, "
                f"{row['scaling']}); of it the logged model (`log_model`: export, MLflow's "
                f"requirements check, upload) {logged_model:.2f} s, the rest {rest:.2%}",
                "value": row["share_of_train_model"],
                "holds": row["share_of_train_model"] <= TARGET_MLFLOW_SHARE,
            }
        )
    return targets


def markdown(report: dict[str, Any]) -> str:
    env, dvc = report["environment"], report["dvc"]
    lines = [
        "# Pipeline benchmark: DVC's no-op cost and MLflow's share of training",
        "",
        f"Run {report['started']} by `bench/pipeline.py {' '.join(report['argv'])}`, commit "
        f"{env['git_commit']}, on {env['cpu']} ({env['cpus']} CPUs), DVC "
        f"{env['versions'].get('dvc')}, MLflow {env['versions'].get('mlflow')}. Load average "
        f"at the start: {', '.join(map(str, env['load_average_at_start']))}.",
        "",
        "## DVC",
        "",
        f"Measured in {dvc['where']}; each command as a user types it (`.venv/bin/dvc`), "
        f"alternating, {len(dvc['repro_noop_s'])} times each. Other processes used "
        f"{dvc['other_cpu_pct']:.0f}% of a CPU meanwhile.",
        "",
        "| command | median s | all runs (s) |",
        "| --- | ---: | --- |",
        f"| `dvc repro`, nothing changed | {dvc['repro_noop_median_s']:.2f} | "
        + ", ".join(f"{s:.2f}" for s in dvc["repro_noop_s"])
        + " |",
        f"| `dvc status dvc.yaml` | {dvc['status_median_s']:.2f} | "
        + ", ".join(f"{s:.2f}" for s in dvc["status_s"])
        + " |",
    ]
    if "first_repro_s" in dvc:
        lines.append(
            f"| first `dvc repro` of the small profile ({dvc['first_repro_stages']} stages) | "
            f"{dvc['first_repro_s']:.1f} | other CPU {dvc['first_repro_other_cpu_pct']:.0f}% |"
        )
    if report["mlflow"]:
        lines += [
            "",
            "## MLflow's share of a training run",
            "",
            "`train_model` as `mnist-pipeline train` runs it, in a fresh process. MLflow's "
            "part: the driver's calls (opening the run: params, tags, the data lineage with "
            "its DVC hash; the final tags and metrics; the curves figure; the logged model: "
            "`torch.export`, upload, and the download that hashes its files), the per-epoch "
            "logging of Ray Train's controller (the same `RunRecorder` call, re-timed once per "
            "epoch on a scratch run of the same store) and the CPU time of MLflow's "
            "system-metrics thread.",
            "",
            "| model | epochs | workers x CPUs | train_model s | MLflow s | share | driver "
            "calls s | per-epoch logging s | system metrics CPU s | imports s | other CPU |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["mlflow"]:
            lines.append(
                f"| {row['model']} | {row['epochs']} | {row['scaling']} | "
                f"{row['train_model_s']:.1f} | {row['total_s']:.2f} | "
                f"{row['share_of_train_model']:.2%} | {row['driver_calls_s']:.2f} | "
                f"{sum(row['per_epoch_logging_s']):.2f} | "
                f"{row['system_metrics_thread_cpu_s']:.2f} | {row['imports_s']:.1f} | "
                f"{row['other_cpu_pct']:.0f}% |"
            )
        lines += ["", "The driver's MLflow calls, seconds:", ""]
        for row in report["mlflow"]:
            calls = ", ".join(f"`{k}` {v:.2f}" for k, v in row["driver_calls"].items())
            lines.append(f"- {row['model']}: {calls}")
    lines += ["", "## Targets", ""]
    for target in report["targets"]:
        mark = "PASS" if target["holds"] else "MISS"
        lines.append(f"- **{mark}** {target['target']}: {target['measured']}")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each dvc command (5)")
    parser.add_argument(
        "--in-repo", action="store_true", help="time dvc in this checkout (must be up to date)"
    )
    parser.add_argument("--models", default="mlp,cnn", help="MLflow share for these ('' none)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: params.yaml's)")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--quick", action="store_true", help="MLflow share on 1 epoch, 5,000")
    parser.add_argument("--workdir", type=Path, help="keep the copy, store, logs here")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file name (default pipeline, pipeline-quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = args.epochs or 1, args.limit or 5000
        args.repeats = min(args.repeats, 3)
    args.models = [m for m in args.models.split(",") if m]
    args.name = args.name or ("pipeline-quick" if args.quick else "pipeline")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, workdir = common.begin("pipeline", args.workdir)
    env = common.environment()
    common.log(f"workdir {workdir}; load average {env['load_average_at_start']}")
    dvc = dvc_in_repo(args.repeats) if args.in_repo else dvc_in_copy(workdir, args.repeats)
    common.log(
        f"no-op dvc repro {dvc['repro_noop_median_s']:.2f} s, "
        f"dvc status {dvc['status_median_s']:.2f} s"
    )
    mlflow: list[dict[str, Any]] = []
    if args.models:
        prepared = common.prepared_data(workdir, args.limit)
        for name in args.models:
            overrides = {f"train.{name}.epochs": args.epochs} if args.epochs else {}
            mlflow.append(mlflow_share(name, workdir, prepared, overrides))
    notes = []
    if dvc["other_cpu_pct"] >= common.DISTURBED_PCT:
        notes.append(f"dvc: other processes used {dvc['other_cpu_pct']:.0f}% of a CPU.")
    for row in mlflow:
        if row["other_cpu_pct"] >= common.DISTURBED_PCT:
            notes.append(
                f"MLflow share, {row['model']}: other processes used "
                f"{row['other_cpu_pct']:.0f}% of a CPU during the run (training slows, the "
                "share shrinks)."
            )
    if args.epochs or args.limit:
        notes.append(
            f"Not the default training ({args.epochs or 'default'} epochs, "
            f"{args.limit or 'all'} images): MLflow's fixed costs weigh more in a shorter run."
        )
    report: dict[str, Any] = {
        "started": started,
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": env,
        "dvc": dvc,
        "mlflow": mlflow,
        "targets": evaluate_targets(dvc, mlflow),
        "notes": notes,
    }
    text = markdown(report)
    common.write_results(args.name, report, text, args.out_dir)
    common.finish(workdir, bool(args.workdir), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
