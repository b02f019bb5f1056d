"""Accuracy benchmark: test accuracy of the default MLP and CNN over several training seeds.

    .venv/bin/python bench/accuracy.py                    # seeds 42,43,44, both models
    .venv/bin/python bench/accuracy.py --seeds 42,43      # fewer (each seed trains both)
    .venv/bin/python bench/accuracy.py --quick            # 2 seeds, 1 epoch, 5,000 images
    .venv/bin/python bench/accuracy.py --help

Each (seed, model) is one `train_model` run with the default params but `seed`, in a fresh
process (bench/run_train.py, as `mnist-pipeline train` runs), followed by the evaluate stage
on the test split. The data are the prepared ones (the repo's `data/prepared` when present,
split with params.yaml's seed): the seed varies the training (initial weights, shuffling,
dropout, augmentation), not the train/validation split. Runs go seed by seed, both models each,
and the results files are rewritten after every run: a run cut short keeps what finished.

On 2 CPUs one seed of both models takes about 6 to 10 minutes.

Writes bench/results/accuracy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # `common`; the repo goes first

import common  # noqa: E402
import yaml  # noqa: E402

REPO = common.REPO


def train_and_evaluate(
    name: str, seed: int, workdir: Path, prepared: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """One default training of `name` with `seed`, then the evaluate stage."""
    folder = workdir / f"{name}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    params = common.scratch_params(folder, {"seed": seed} | overrides, prepared=prepared)
    params_file, out, log_file = folder / "params.yaml", folder / "result.json", folder / "log"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    command = [
        sys.executable, str(REPO / "bench" / "run_train.py"), "--params", str(params_file),
        "--model", name, "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--run-name", f"bench-{name}-seed{seed}", "--out", str(out), "--evaluate",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with log_file.open("wb") as sink, common.cpu_share() as share:
        done = subprocess.run(command, cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name} seed {seed} failed, log {log_file}:\n{tail}")
    result = json.loads(out.read_text())
    scaling = params.train.scaling
    return {
        "model": name,
        "seed": seed,
        "epochs": params.train.model(name).epochs,
        "augment": params.train.model(name).augment,
        "scaling": f"{scaling.num_workers}x{scaling.cpus_per_worker}",
        "test_accuracy": result["evaluation"]["test_accuracy"],
        "test_loss": result["evaluation"]["test_loss"],
        "best_epoch": result["best_epoch"],
        "best_val_accuracy": result["best_val_accuracy"],
        "train_model_s": result["train_model_s"],
        "process_s": share.wall_s,
        "other_cpu_pct": share.other_pct,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: mean and sample standard deviation (n - 1) of the test accuracy."""
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["model"] for r in runs):
        values = [r["test_accuracy"] for r in runs if r["model"] == name]
        summary[name] = {
            "seeds": [r["seed"] for r in runs if r["model"] == name],
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "min": min(values),
            "max": max(values),
        }
    return summary


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    done, planned = len(report["runs"]), report["planned_runs"]
    lines = [
        "# Accuracy benchmark: test accuracy over training seeds",
        "",
        f"Run {report['started']} by `bench/accuracy.py {' '.join(report['argv'])}`, commit "
        f"{env['git_commit']}, on {env['cpu']} ({env['cpus']} CPUs). {done} of {planned} "
        f"runs finished{'' if done == planned else ' (the rest did not run)'}. Each run: "
        "`train_model` on the default params but `seed` (fresh process, local Ray, as "
        "`mnist-pipeline train`), then the evaluate stage on the test split "
        f"({report['test_images']:,} images). The train/validation split is the prepared one "
        "(params.yaml's seed); the seed varies the training only.",
        "",
        "| model | seeds | test accuracy, mean ± std | min | max |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, row in report["summary"].items():
        lines.append(
            f"| {name} | {', '.join(map(str, row['seeds']))} | {row['mean']:.2%} ± "
            f"{common.fmt(100 * row['std'], 2)} pp | {row['min']:.2%} | {row['max']:.2%} |"
        )
    lines += [
        "",
        "| model | seed | epochs | workers x CPUs | test accuracy | test loss | best epoch "
        "| best val accuracy | train_model s | other CPU |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['model']} | {run['seed']} | {run['epochs']} | {run['scaling']} | "
            f"{run['test_accuracy']:.2%} | {run['test_loss']:.4f} | {run['best_epoch']} | "
            f"{run['best_val_accuracy']:.4f} | {run['train_model_s']:.0f} | "
            f"{run['other_cpu_pct']:.0f}% |"
        )
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated training seeds")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--epochs", type=int, help="override every model's epochs")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--quick", action="store_true", help="seeds 42,43, 1 epoch, 5,000")
    parser.add_argument("--workdir", type=Path, help="keep runs, store, logs here")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file name (default accuracy, accuracy-quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = "42,43" if args.seeds == "42,43,44" else args.seeds
        args.epochs, args.limit = args.epochs or 1, args.limit or 5000
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.models = [m for m in args.models.split(",") if m]
    args.name = args.name or ("accuracy-quick" if args.quick else "accuracy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.data.prepared import open_prepared

    started, workdir = common.begin("accuracy", args.workdir)
    env = common.environment()
    common.log(f"workdir {workdir}; load average {env['load_average_at_start']}")
    prepared = common.prepared_data(workdir, args.limit)
    experiment = common.scratch_params(workdir, {}).mlflow.experiment
    common.init_store(f"sqlite:///{workdir / 'mlflow.db'}", experiment)
    report: dict[str, Any] = {
        "started": started,
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": env,
        "test_images": open_prepared(prepared).sizes["test"],
        "planned_runs": len(args.seeds) * len(args.models),
        "runs": [],
        "summary": {},
        "notes": [],
    }
    for seed in args.seeds:
        for name in args.models:
            overrides = {f"train.{name}.epochs": args.epochs} if args.epochs else {}
            common.log(f"{name} seed {seed} ...")
            run = train_and_evaluate(name, seed, workdir, prepared, overrides)
            common.log(
                f"{name} seed {seed}: test accuracy {run['test_accuracy']:.4f} "
                f"({run['train_model_s']:.0f} s)"
            )
            report["runs"].append(run)
            report["summary"] = summarise(report["runs"])
            report["notes"] = [
                f"{r['model']} seed {r['seed']}: other processes used {r['other_cpu_pct']:.0f}% "
                "of a CPU (slower, not less accurate)."
                for r in report["runs"]
                if r["other_cpu_pct"] >= common.DISTURBED_PCT
            ]
            if args.epochs or args.limit:
                report["notes"].append(
                    f"Not the default training ({args.epochs or 'default'} epochs, "
                    f"{args.limit or 'all'} images)."
                )
            common.write_results(args.name, report, markdown(report), args.out_dir)
    common.finish(workdir, bool(args.workdir), markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
