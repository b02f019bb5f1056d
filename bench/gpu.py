"""GPU benchmark: the CNN through the project's Ray Train path on one GPU (1 worker, bf16
mixed precision) and the plain PyTorch reference loop on the same GPU, in one run.

    .venv/bin/python bench/gpu.py                 # CNN, params.yaml's epochs (8), full data
    .venv/bin/python bench/gpu.py --epochs 3      # shorter
    .venv/bin/python bench/gpu.py --cpu-dry-run --limit 3000 --epochs 1   # checks the script
    .venv/bin/python bench/gpu.py --help

Needs a CUDA build of torch (requirements.lock pins the CPU build: on a GPU machine install
e.g. `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128` into the
venv first); without a CUDA device it stops at once with exit status 2 and says so.

1. reference: the loop of bench/training.py on `cuda:0`: the whole split as one tensor on the
   GPU, autocast to bfloat16 around forward and loss (as Lightning's "bf16-mixed"), AdamW and
   one-cycle, the same augmentation as params.yaml says (on for the CNN), the same batch size.
   Test accuracy of its last epoch's network on the test split.
2. ray: `pipeline.training.driver.train_model` in a fresh process (bench/run_train.py, as
   `mnist-pipeline train` runs it) with `train.scaling`: 1 worker, `use_gpu: true` (the
   workers then use NCCL and bf16-mixed), then the evaluate stage: test accuracy of the
   exported best checkpoint.

Reports per-epoch seconds (median after the first epoch), images/s, test accuracy, the Ray
run's fixed overhead, and the card. About 2 to 4 minutes on an H100 class GPU.

Writes bench/results/gpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # `common`; the repo goes first

import common  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from training import ReferenceLoop, load_split, steady  # noqa: E402

REPO = common.REPO
NAME = "cnn"


def device_info(device: str) -> dict[str, Any]:
    if device == "cpu":
        return {"device": "cpu (dry run: not a GPU measurement)", "cpu": common.cpu_model()}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "driver_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
    }


def reference_run(
    params: Any, prepared: Path, epochs: int, device: str, bf16: bool
) -> dict[str, Any]:
    from pipeline.evaluate import evaluate

    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    loop = ReferenceLoop("cnn", params, train, val, epochs, params.seed, device=device, bf16=bf16)
    results = []
    for epoch in range(epochs):
        results.append(loop.epoch())
        common.log(
            f"reference epoch {epoch + 1}/{epochs}: {results[-1].seconds:.2f} s, "
            f"val accuracy {results[-1].val_accuracy:.4f}"
        )
    from pipeline.data.prepared import open_prepared

    net = loop.net.to("cpu").float().eval()
    test = evaluate(net, open_prepared(prepared).load("test"))
    seconds = [r.seconds for r in results]
    return {
        "epochs_s": seconds,
        "epoch_s": steady(seconds),
        "images_per_s": len(train) / steady(seconds),
        "test_accuracy": test.accuracy,
        "val_accuracy": results[-1].val_accuracy,
    }


def ray_run(
    params: Any, workdir: Path, use_gpu: bool, cpus: int, timeout_s: float
) -> dict[str, Any]:
    raw = params.model_dump(mode="json")
    raw["train"]["scaling"] = {"num_workers": 1, "cpus_per_worker": cpus, "use_gpu": use_gpu}
    params_file, out, log_file = workdir / "ray.yaml", workdir / "ray.json", workdir / "ray.log"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    command = [
        sys.executable, str(REPO / "bench" / "run_train.py"), "--params", str(params_file),
        "--model", NAME, "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--run-name", "bench-gpu-cnn", "--out", str(out), "--evaluate",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with log_file.open("wb") as sink:
        done = subprocess.run(
            command, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s
        )
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"the Ray run failed, log {log_file}:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    seconds = result["epochs"].get("per_epoch_s", [])
    return {
        "epochs_s": seconds,
        "epoch_s": steady(seconds),
        "train_model_s": result["train_model_s"],
        "fixed_overhead_s": result["fixed_overhead_s"],
        "phases_s": result["phases_s"],
        "runtime": result["runtime"],
        "test_accuracy": result["evaluation"]["test_accuracy"],
        "best_val_accuracy": result["best_val_accuracy"],
        "best_epoch": result["best_epoch"],
    }


def markdown(report: dict[str, Any]) -> str:
    dev, ref, ray_ = report["device"], report["reference"], report["ray"]
    lines = [
        "# GPU benchmark: the CNN through Ray Train on one GPU vs a plain loop",
        "",
        f"Run {report['started']} by `bench/gpu.py {' '.join(report['argv'])}`, commit "
        f"{report['git_commit']}, on {dev['device']}"
        + (f" ({dev['memory_gib']} GiB, CUDA {dev['cuda']})" if "cuda" in dev else "")
        + f", torch {torch.__version__}. CNN, {report['epochs']} epochs, batch "
        f"{report['batch_size']}, augmentation {'on' if report['augment'] else 'off'} in both, "
        f"{report['train_images']:,} training images; precision "
        f"{'bf16 autocast' if report['bf16'] else 'float32'} in both.",
        "",
        "| path | s/epoch | images/s | test accuracy | fixed s | epochs (s) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| reference (plain loop, data on the device) | {ref['epoch_s']:.2f} | "
        f"{ref['images_per_s']:,.0f} | {ref['test_accuracy']:.2%} | - | "
        + ", ".join(f"{s:.2f}" for s in ref["epochs_s"])
        + " |",
        f"| ray 1 worker on {ray_['runtime'].get('device')} ({ray_['runtime'].get('precision')}, "
        f"{ray_['runtime'].get('backend')}) | {ray_['epoch_s']:.2f} | "
        f"{report['train_images'] / ray_['epoch_s']:,.0f} | {ray_['test_accuracy']:.2%} | "
        f"{common.fmt(ray_['fixed_overhead_s'])} | "
        + ", ".join(f"{s:.2f}" for s in ray_["epochs_s"])
        + " |",
        "",
        f"Ray per epoch / reference per epoch: {ray_['epoch_s'] / ref['epoch_s']:.2f}x. "
        "Ray's fixed overhead is all of `train_model` outside the epochs (Ray start, MLflow "
        "run, worker group, export, logged model, shutdown).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, help="default: params.yaml's train.cnn.epochs")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument("--cpus-per-worker", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=420.0, help="for the Ray run, s")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run every step on the CPU in float32 (checks the script; measures no GPU)",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file name (default gpu; dry run: gpu-dry-run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            f"bench/gpu.py: no CUDA device (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False). This benchmark needs a GPU and a CUDA "
            "build of torch; --cpu-dry-run checks the script on the CPU.",
            file=sys.stderr,
        )
        return 2
    device, bf16 = ("cpu", False) if args.cpu_dry_run else ("cuda", True)
    name = args.name or ("gpu-dry-run" if args.cpu_dry_run else "gpu")
    started, workdir = common.begin("gpu", args.workdir)
    common.log(f"workdir {workdir}; {device_info(device)['device']}")
    prepared = common.prepared_data(workdir, args.limit)
    overrides = {f"train.{NAME}.epochs": args.epochs} if args.epochs else {}
    params = common.scratch_params(workdir / "run", overrides, prepared=prepared)
    config = params.train.model(NAME)
    from pipeline.data.prepared import open_prepared

    train_images = open_prepared(prepared).sizes["train"]
    reference = reference_run(params, prepared, config.epochs, device, bf16)
    common.log(f"reference: {reference['epoch_s']:.2f} s/epoch")
    cpus = min(args.cpus_per_worker, os.cpu_count() or 1)
    ray_result = ray_run(params, workdir, not args.cpu_dry_run, cpus, args.timeout)
    ray_result["images_per_s"] = train_images / ray_result["epoch_s"]
    common.log(f"ray: {ray_result['epoch_s']:.2f} s/epoch")
    report = {
        "started": started,
        "argv": sys.argv[1:] if argv is None else argv,
        "git_commit": common.git_commit(),
        "device": device_info(device),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "augment": config.augment,
        "bf16": bf16,
        "train_images": train_images,
        "reference": reference,
        "ray": ray_result,
    }
    text = markdown(report)
    common.write_results(name, report, text, args.out_dir)
    common.finish(workdir, bool(args.workdir), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
