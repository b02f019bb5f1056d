"""Training benchmark: the project's training paths against a plain PyTorch loop."""

import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import common
from bench.report import write
from bench.training.report import RAY_FIXED_PHASES, markdown, model_targets

RAY_KEEP = ("fixed_overhead_s", "phases_s", "train_model_s", "imports_s", "mlflow", "runtime")


def steady(seconds: list[float]) -> float:
    """Per-epoch seconds: the median, after the first epoch (warm-up) when there are 3+."""
    return statistics.median(seconds[1:] if len(seconds) >= 3 else seconds or [math.nan])


def row(path: str, seconds: list[float], ref_s: float, work: dict[str, Any]) -> dict[str, Any]:
    epoch_s = steady(seconds)
    flops = work["train_images"] * work["train_flops"] + work["val_images"] * work["val_flops"]
    found = {"model": work["model"], "path": path, "epoch_s": epoch_s, "reference_epoch_s": ref_s}
    found |= {"ratio": epoch_s / ref_s, "images_per_s": work["train_images"] / epoch_s}
    return found | {"gflops": flops / epoch_s / 1e9, "epochs_s": [round(s, 3) for s in seconds]}


def bench_model(name: Any, args: Any, prepared: Path, workdir: Path) -> Any:
    import torch

    from bench.training import loops
    from pipeline.data.prepared import open_prepared

    epochs = {f"train.{name}.epochs": args.epochs}
    params = common.scratch_params(workdir, epochs, prepared)
    config, net, rows = params.train.model(name), loops.network(name, params), []
    # What an epoch computes, and what two workers' all-reduces cost it at the least (each
    # takes half the global batch: as many steps as one worker).
    sizes = open_prepared(Path(params.paths.prepared)).sizes
    work: dict[str, Any] = {"model": name, "epochs": config.epochs, "augment": config.augment}
    work |= {"batch_size": config.batch_size, "train_images": sizes["train"]}
    work |= {"val_images": sizes["val"], "parameters": sum(p.numel() for p in net.parameters())}
    batch, per_step = config.batch_size, loops.allreduce_s(work["parameters"])
    work["train_flops"], work["val_flops"] = loops.flops_per_image(net, batch, config.augment)
    steps = math.ceil(sizes["train"] / batch)
    work |= {"allreduce_ms": per_step * 1e3, "allreduce_s_per_epoch": per_step * steps}
    common.log(f"{name}: {work['train_images']:,} images, reference and lightning interleaved")
    pair = loops.lightning_interleaved(name, params, loops.ReferenceLoop(name, params, args.epochs))
    ref_s, threads = steady([e.wall_s for e in pair.references]), str(torch.get_num_threads())
    for path, series in (("reference", pair.references), ("lightning", pair.epochs)):
        found = row(path, [e.wall_s for e in series], ref_s, work) | {"threads": threads}
        found["other_cpu_pct"] = statistics.mean(e.other_pct for e in series)
        rows.append(found)
    # Ray Train through train_model in a fresh process, each run between two reference epochs.
    bracket = loops.ReferenceLoop(name, params, 2 * len(args.ray) + 1)
    for workers, cpus in args.ray:
        scaling = {"train.scaling.num_workers": workers, "train.scaling.cpus_per_worker": cpus}
        ray_params = common.scratch_params(workdir, epochs | scaling, prepared)
        before, shape = bracket.epoch().wall_s, f"{workers}x{cpus}"
        common.log(f"{name}: ray {shape} ...")
        result, meter = common.train_fresh(ray_params, name, workdir / name, f"{name}-{shape}")
        around = [before, bracket.epoch().wall_s]
        seconds = result["epochs"]["per_epoch_s"]
        found = row(f"ray {shape}", seconds, statistics.mean(around), work)
        found |= {k: result[k] for k in RAY_KEEP} | {"bracket_reference_s": around}
        found |= {"threads": shape, "other_cpu_pct": meter.other_pct}
        found["ray_fixed_s"] = sum(result["phases_s"][k] for k in RAY_FIXED_PHASES)
        found["mlflow_s"] = result["mlflow"]["total_s"]
        rows.append(found)
    for found in rows:
        common.log(f"{name} {found['path']}: {found['epoch_s']:.2f} s/epoch, {found['ratio']:.2f}x")
    return rows, work


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every path (4)")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--ray", default="1x2,2x1", help="Ray runs: WORKERSxCPUS,... ('': none)")
    parser.add_argument("--quick", action="store_true", help="2 epochs on 5,000 images")
    malloc = "glibc malloc settings of every path: the project's (TRAINING_ENV) or glibc's"
    parser.add_argument(
        "--allocator", choices=("project", "default"), default="project", help=malloc
    )
    args = parser.parse_args(argv)
    from pipeline.training.ray_env import TRAINING_ENV

    wanted = TRAINING_ENV if args.allocator == "project" else dict.fromkeys(TRAINING_ENV, "")
    if any(os.environ.get(k, "") != v for k, v in wanted.items()):
        # Every path with the same malloc settings; glibc reads them at process start.
        arguments, env = sys.argv[1:] if argv is None else argv, os.environ | wanted
        command = [sys.executable, "-m", "bench.training.run", *arguments]
        os.execve(sys.executable, command, {k: v for k, v in env.items() if v})
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banners
    if args.quick:
        args.epochs, args.limit = 2, args.limit or 5000
    args.ray = [tuple(int(n) for n in text.split("x")) for text in args.ray.split(",") if text]
    report, workdir = common.begin("training", args, argv)
    prepared, samples = common.prepared_data(workdir, args.limit), [common.gemm_flops()]
    report |= {"models": {}, "rows": []}
    for name in (m for m in args.models.split(",") if m):
        rows, report["models"][name] = bench_model(name, args, prepared, workdir)
        report["rows"] += rows
        samples.append(common.gemm_flops())  # a burst of foreign load only lowers one sample
    for found in report["rows"]:  # against the best ceiling of the run
        found["gemm_fraction"] = found["gflops"] * 1e9 / max(samples)
    scaling = common.scratch_params(workdir, {}).train.scaling
    default = f"ray {scaling.num_workers}x{scaling.cpus_per_worker}"
    targets = [model_targets(model, report["rows"], default) for model in report["models"]]
    report |= {"gemm_gflops": [s / 1e9 for s in samples], "targets": sum(targets, [])}
    report["notes"] = common.disturbed(report["rows"], "model", "path")
    write("training-quick" if args.quick else "training", report, markdown(report), args.out_dir)
    common.finish(args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
