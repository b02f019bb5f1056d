"""GPU benchmark: the CNN through Ray Train on one GPU against the plain loop on it."""

import os
import sys
from typing import Any

from bench import common
from bench.report import header, table, write

COLUMNS = (
    "path={path} | s/epoch={epoch_s:.2f} | images/s={images_per_s:,.0f} | test accuracy="
    "{test_accuracy:.2%} | fixed s={fixed_overhead_s:.1f} | epochs (s)={epochs_s}"
)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--epochs", type=int, help="default: params.yaml's train.cnn.epochs")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="all on the CPU, float32")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"bench.gpu: no CUDA device (torch {torch.__version__})", file=sys.stderr)
        return 2
    from bench.training.loops import ReferenceLoop
    from bench.training.run import steady
    from pipeline.data.prepared import open_prepared
    from pipeline.evaluate import evaluate

    report, workdir = common.begin("gpu", args, argv)
    device = "cpu" if args.cpu_dry_run else "cuda"
    prepared = common.prepared_data(workdir, args.limit)
    scaling = {"train.scaling.num_workers": 1, "train.scaling.use_gpu": device == "cuda"}
    scaling["train.scaling.cpus_per_worker"] = min(4, os.cpu_count() or 1)
    epochs = {"train.cnn.epochs": args.epochs} if args.epochs else {}
    params = common.scratch_params(workdir / "run", scaling | epochs, prepared)
    # The training benchmark's loop on the device (the splits on it, bf16 autocast on a GPU).
    loop = ReferenceLoop("cnn", params, params.train.cnn.epochs, device)
    seconds = [loop.epoch().wall_s for _ in range(params.train.cnn.epochs)]
    test = evaluate(loop.net.to("cpu").float(), open_prepared(prepared).load("test")).accuracy
    rows: list[dict[str, Any]] = [{"path": f"reference on {device}", "epochs": seconds}]
    rows[0]["test_accuracy"] = test
    result, _ = common.train_fresh(params, "cnn", workdir, "gpu-cnn", evaluate=True)
    runtime = result["runtime"]
    path = f"ray 1 worker on {runtime['device']} ({runtime['precision']}, {runtime['backend']})"
    rows.append({"path": path, "epochs": result["epochs"]["per_epoch_s"]} | result["evaluation"])
    rows[-1]["fixed_overhead_s"] = result["fixed_overhead_s"]
    for row in rows:
        row |= {"epoch_s": steady(row["epochs"]), "epochs_s": [round(s, 2) for s in row["epochs"]]}
        row["images_per_s"] = open_prepared(prepared).sizes["train"] / row["epoch_s"]
    if device == "cuda":
        report["environment"]["cpu"] += f", {torch.cuda.get_device_name(0)}"
    report |= {"rows": rows, "runtime": runtime}
    title = "GPU benchmark: the CNN through Ray Train on one GPU vs a plain loop"
    parts = [header(title, "bench.gpu", report), *table(rows, COLUMNS)]
    write("gpu-dry-run" if args.cpu_dry_run else "gpu", report, parts, args.out_dir)
    common.finish(args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
