"""Accuracy benchmark: test accuracy of the default MLP and CNN over training seeds."""

import statistics
from typing import Any

from bench import common
from bench.report import header, table, write

SUMMARY = (
    "model={model} | seeds={seeds} | test accuracy, mean={mean:.2%} | ± std={std_pp:.2f} pp | "
    "min={min:.2%} | max={max:.2%}"
)


def summary(runs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of a model's test accuracy."""
    values = [r["test_accuracy"] for r in runs if r["model"] == name]
    found = {"model": name, "seeds": ", ".join(str(r["seed"]) for r in runs if r["model"] == name)}
    found |= {"mean": statistics.mean(values), "min": min(values), "max": max(values)}
    return found | {"std_pp": 100 * statistics.stdev(values) if len(values) > 1 else None}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated training seeds")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument("--epochs", type=int, help="every model's (default: params.yaml's)")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--quick", action="store_true", help="seeds 42,43, 1 epoch, 5,000 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.limit = "42,43", args.epochs or 1, args.limit or 5000
    report, workdir = common.begin("accuracy", args, argv)
    title = "Accuracy benchmark: test accuracy over training seeds"
    prepared, report["runs"] = common.prepared_data(workdir, args.limit), []
    for seed in (int(s) for s in args.seeds.split(",") if s):
        for name in (m for m in args.models.split(",") if m):
            epochs = {f"train.{name}.epochs": args.epochs} if args.epochs else {}
            params = common.scratch_params(workdir / name, {"seed": seed} | epochs, prepared)
            result, meter = common.train_fresh(params, name, workdir, f"{name}-{seed}", True)
            found = {"model": name, "seed": seed, "epochs": params.train.model(name).epochs}
            found |= {k: result[k] for k in ("best_epoch", "best_val_accuracy", "train_model_s")}
            report["runs"].append(found | result["evaluation"] | {"other_cpu_pct": meter.other_pct})
            common.log(f"{name} seed {seed}: test accuracy {report['runs'][-1]['test_accuracy']}")
            models = dict.fromkeys(r["model"] for r in report["runs"])
            report["summary"] = [summary(report["runs"], model) for model in models]
            report["notes"] = common.disturbed(report["runs"], "model", "seed")
            parts = [header(title, "bench.accuracy", report), *table(report["summary"], SUMMARY)]
            out = "accuracy-quick" if args.quick else "accuracy"
            write(out, report, parts, args.out_dir)
    common.finish(args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
