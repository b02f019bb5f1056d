"""Training benchmark: the project's training paths against a plain PyTorch loop, and against
the machine's matrix-multiply ceiling, in one run.

    .venv/bin/python bench/training.py            # MLP and CNN, 4 epochs each, full data
    .venv/bin/python bench/training.py --quick    # 2 epochs on 5,000 images: checks the script
    .venv/bin/python bench/training.py --help

Per model, on the same prepared data, network, batch size, augmentation and epochs:

- reference: a plain PyTorch loop written here (one process, torch's default threads, the
  split as one uint8 tensor sliced per batch, AdamW + one-cycle as the project's module);
- lightning: the project's `Classifier` and callbacks in one process (`pl.Trainer`, no Ray),
  fed by the project's loaders; its epochs alternate with the reference's (one reference
  epoch runs before each Lightning epoch), so bursts of foreign load hit both;
- ray NxC: `pipeline.training.driver.train_model`, as `mnist-pipeline train` runs it (a fresh
  process, local Ray, MLflow run, checkpoints, export), with N workers of C CPUs; one
  reference epoch right before and one right after each such run give its reference.

Writes bench/results/training.json and .md (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent))  # `common`; the repo goes first

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
import yaml  # noqa: E402

from pipeline.config.base import ModelName
from pipeline.training.ray_env import TRAINING_ENV  # noqa: E402

REPO = common.REPO
TARGET_LIGHTNING = 1.05  # Lightning per-epoch / reference per-epoch
TARGET_RAY_ONE = 1.10  # Ray Train, 1 worker, per-epoch / reference
TARGET_FIXED_S = 15.0  # Ray Train fixed overhead: Ray start, worker group start, teardown
# The phases of a Ray run (bench/run_train.py) that make up the fixed overhead; the
# MLflow run's opening and the model's export and logging are reported beside them.
RAY_FIXED_PHASES = ("ray start", "worker group start", "worker group end", "ray shutdown")
TARGET_CNN_GEMM = 0.30  # CNN training FLOP/s / the machine's float32 GEMM FLOP/s
EVAL_BATCH = 1000


# --------------------------------------------------------------------------- data and FLOPs


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, 28, 28)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


def load_split(prepared: Path, split: str) -> Split:
    from pipeline.data.prepared import open_prepared

    arrays = open_prepared(prepared).load(split)  # type: ignore[arg-type]
    return Split(torch.from_numpy(arrays.images), torch.from_numpy(arrays.labels).long())


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], as the networks take it."""
    return images.unsqueeze(1).to(torch.float32).div_(255.0)


def flops_per_image(net: torch.nn.Module, batch: int, augment: bool) -> tuple[float, float]:
    """(training, evaluation) FLOPs per image: torch's FlopCounterMode over one batch's forward
    and backward (training) or forward (evaluation). It counts matrix multiplications and
    convolutions, forward and backward (about 3x the forward), not the element-wise work
    (normalisation, activations, pooling, augmentation, the optimiser)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.module import random_affine

    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    net.train()
    with FlopCounterMode(display=False) as counter:
        inputs = random_affine(x) if augment else x
        F.cross_entropy(net(inputs), y).backward()
    train = counter.get_total_flops() / batch
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    net.zero_grad(set_to_none=True)
    return train, counter.get_total_flops() / batch


def _allreduce_rank(rank: int, port: int, numel: int, steps: int, out: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gradients = torch.ones(numel)
    for _ in range(5):
        dist.all_reduce(gradients)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        dist.all_reduce(gradients)
    if rank == 0:
        out.put((time.perf_counter() - started) / steps)
    dist.destroy_process_group()


def allreduce_s(numel: int, steps: int = 100) -> float:
    """Seconds per all-reduce of `numel` float32 (one step's gradients) between two gloo
    processes of one thread on this machine, with nothing else to do: what each DDP step
    of two workers pays at least, beside its computation."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    ranks = [
        context.Process(target=_allreduce_rank, args=(rank, port, numel, steps, out))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    seconds = float(out.get(timeout=300))
    for process in ranks:
        process.join(timeout=60)
    return seconds


# --------------------------------------------------------------------------- the reference


@dataclass
class EpochResult:
    seconds: float  # training + validation
    train_s: float
    val_s: float
    val_accuracy: float
    train_loss: float
    other_cpu_pct: float = float("nan")


class ReferenceLoop:
    """Plain PyTorch: the same network, loss, optimiser and schedule as the project's
    `Classifier`, the split as one in-memory tensor, a random permutation per epoch sliced
    into batches, validation after each epoch. No framework, no logging."""

    def __init__(
        self,
        name: ModelName,
        params: Any,
        train: Split,
        val: Split,
        epochs: int,
        seed: int,
        device: str = "cpu",
        bf16: bool = False,
    ) -> None:
        from pipeline.data.prepared import open_prepared
        from pipeline.models.networks import build_network

        config = params.train.model(name)
        norm = open_prepared(Path(params.paths.prepared)).normalization
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        net = build_network(name, config.net.model_dump(), norm.mean, norm.std)
        # The network as the project trains it: Classifier makes conv weights channels-last.
        self.net = net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.rng = torch.get_rng_state()  # its own stream: interleaving changes no one's draws
        torch.set_rng_state(outer)
        self.config = config
        self.device = torch.device(device)
        # The whole split on the device, as one tensor each: no loader at all.
        self.train = Split(train.images.to(device), train.labels.to(device))
        self.val = Split(val.images.to(device), val.labels.to(device))
        # As Lightning's "bf16-mixed": autocast around forward and loss, float32 weights.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        steps = math.ceil(len(train) / config.batch_size)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=config.lr, total_steps=epochs * steps
        )

    def _epoch(self) -> EpochResult:
        from pipeline.models.module import random_affine

        config, images, labels = self.config, self.train.images, self.train.labels
        self._sync()
        started = time.perf_counter()
        self.net.train()
        order = torch.randperm(len(labels), device=self.device)
        total = torch.zeros((), device=self.device)
        for first in range(0, len(labels), config.batch_size):
            index = order[first : first + config.batch_size]
            x = unit_float(images.index_select(0, index))
            y = labels.index_select(0, index)
            if config.augment:
                x = random_affine(x)
            with self.autocast:
                logits = self.net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.detach() * len(y)
        self._sync()
        trained = time.perf_counter()
        self.net.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad(), self.autocast:
            for first in range(0, len(self.val), EVAL_BATCH):
                window = slice(first, first + EVAL_BATCH)
                logits = self.net(unit_float(self.val.images[window]))
                correct += (logits.argmax(1) == self.val.labels[window]).sum()
        accuracy = int(correct) / len(self.val)  # waits for the device
        done = time.perf_counter()
        return EpochResult(
            seconds=done - started,
            train_s=trained - started,
            val_s=done - trained,
            val_accuracy=accuracy,
            train_loss=float(total) / len(labels),
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def epoch(self) -> EpochResult:
        """One epoch on the loop's own random stream (the caller's is left as it was)."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        meter = common.CpuMeter()
        try:
            result = self._epoch()
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(outer)
        result.other_cpu_pct = meter.stop().other_pct
        return result


# --------------------------------------------------------------------------- Lightning


def project_loaders(params: Any, name: ModelName, train: Split, val: Split) -> tuple[Any, Any]:
    """The loaders the project's workers build, for one process (rank 0 of 1)."""
    from pipeline.data.prepared import SplitArrays
    from pipeline.training import worker as project

    batch = params.train.model(name).batch_size
    arrays = (
        SplitArrays(train.images.numpy(), train.labels.numpy().astype("uint8")),
        SplitArrays(val.images.numpy(), val.labels.numpy().astype("uint8")),
    )
    return project.make_loaders(*arrays, batch_size=batch, rank=0, world_size=1, seed=params.seed)


def lightning_interleaved(
    name: ModelName, params: Any, train: Split, val: Split, reference: ReferenceLoop | None
) -> dict[str, Any]:
    """Fit the project's module in this process; before each of its epochs, one reference
    epoch. Returns both series and the Lightning run's setup/teardown seconds."""
    import lightning.pytorch as pl

    from pipeline.data.prepared import open_prepared
    from pipeline.models.module import Classifier
    from pipeline.models.networks import build_network
    from pipeline.training.worker import EpochHistory, RngState

    config = params.train.model(name)
    norm = open_prepared(Path(params.paths.prepared)).normalization

    class Interleave(pl.Callback):
        """Stamps each Lightning epoch from its start to the next one's (so everything the
        loop does between epochs counts), with a reference epoch run in between, untimed
        for Lightning."""

        def __init__(self) -> None:
            self.lightning: list[EpochResult] = []
            self.reference: list[EpochResult] = []
            self._start = 0.0
            self._meter: common.CpuMeter | None = None
            self._history: EpochHistory | None = None

        def _close(self, trainer: pl.Trainer) -> None:
            if self._meter is None:
                return
            seconds = time.perf_counter() - self._start
            share = self._meter.stop()
            rows = history.rows
            row = rows[-1] if rows else {}
            self.lightning.append(
                EpochResult(
                    seconds=seconds,
                    train_s=float("nan"),
                    val_s=float("nan"),
                    val_accuracy=float(row.get("val/accuracy", float("nan"))),
                    train_loss=float(row.get("train/loss", float("nan"))),
                    other_cpu_pct=share.other_pct,
                )
            )

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self._close(trainer)
            if reference is not None:
                self.reference.append(reference.epoch())
                common.log(f"  reference epoch {self.reference[-1].seconds:.2f} s")
            self._meter = common.CpuMeter()
            self._start = time.perf_counter()

        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self._close(trainer)
            self._meter = None

    pl.seed_everything(params.seed, verbose=False)
    net = build_network(name, config.net.model_dump(), norm.mean, norm.std)
    module = Classifier(net, config)
    train_loader, val_loader = project_loaders(params, name, train, val)
    history = EpochHistory(config.epochs)
    clock = Interleave()
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        callbacks=[clock, history, RngState()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - started
    in_epochs = sum(e.seconds for e in clock.lightning) + sum(e.seconds for e in clock.reference)
    return {
        "lightning": clock.lightning,
        "reference": clock.reference,
        "fixed_overhead_s": wall - in_epochs,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- Ray Train


@dataclass(frozen=True)
class RayConfig:
    workers: int
    cpus: int

    @property
    def label(self) -> str:
        return f"ray {self.workers}x{self.cpus}"

    @classmethod
    def parse(cls, text: str) -> RayConfig:
        workers, _, cpus = text.partition("x")
        return cls(int(workers), int(cpus or 1))


def ray_run(
    name: ModelName, params: Any, config: RayConfig, workdir: Path, uri: str
) -> tuple[dict[str, Any], common.CpuShare]:
    """`train_model` in a fresh process (bench/run_train.py) with N workers of C CPUs."""
    raw = params.model_dump(mode="json")
    raw["train"]["scaling"] |= {"num_workers": config.workers, "cpus_per_worker": config.cpus}
    tag = f"{name}-{config.workers}x{config.cpus}"
    workdir.mkdir(parents=True, exist_ok=True)
    params_file, out, log_file = (workdir / f"{tag}{ext}" for ext in (".yaml", ".json", ".log"))
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    command = [
        sys.executable, str(REPO / "bench" / "run_train.py"),
        "--params", str(params_file), "--model", name, "--tracking-uri", uri,
        "--run-name", f"bench-{tag}", "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    with log_file.open("wb") as sink, common.cpu_share() as share:
        done = subprocess.run(command, cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{config.label} ({name}) failed, log {log_file}:\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["process_wall_s"] = share.wall_s
    return result, share


# --------------------------------------------------------------------------- one model


def steady(seconds: list[float]) -> float:
    """Per-epoch seconds: the median, leaving out the first epoch (warm-up) when there are
    three or more."""
    if not seconds:
        return float("nan")
    return statistics.median(seconds[1:] if len(seconds) >= 3 else seconds)


@dataclass
class Row:
    model: str
    path: str
    threads: str
    epochs: int
    epoch_s: float  # steady per-epoch seconds
    first_epoch_s: float
    reference_epoch_s: float  # the reference this row is compared with
    ratio: float  # epoch_s / reference_epoch_s
    images_per_s: float
    gflops: float
    gemm_fraction: float
    fixed_overhead_s: float | None
    val_accuracy: float
    other_cpu_pct: float
    epochs_s: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def make_row(
    model: str,
    path: str,
    threads: str,
    seconds: list[float],
    reference_s: float,
    work: dict[str, float],
    gemm: float,
    fixed: float | None,
    accuracy: float,
    other_pct: float,
    details: dict[str, Any] | None = None,
) -> Row:
    per_epoch = steady(seconds)
    flops = work["train_images"] * work["train_flops"] + work["val_images"] * work["val_flops"]
    return Row(
        model=model,
        path=path,
        threads=threads,
        epochs=len(seconds),
        epoch_s=per_epoch,
        first_epoch_s=seconds[0] if seconds else float("nan"),
        reference_epoch_s=reference_s,
        ratio=per_epoch / reference_s,
        images_per_s=work["train_images"] / per_epoch,
        gflops=flops / per_epoch / 1e9,
        gemm_fraction=flops / per_epoch / gemm,
        fixed_overhead_s=fixed,
        val_accuracy=accuracy,
        other_cpu_pct=other_pct,
        epochs_s=[round(s, 3) for s in seconds],
        details=details or {},
    )


def bench_model(
    name: ModelName, args: argparse.Namespace, prepared: Path, workdir: Path, gemm: float
) -> tuple[list[Row], dict[str, Any]]:
    overrides: dict[str, Any] = {f"train.{name}.epochs": args.epochs}
    if args.augment != "params":
        overrides[f"train.{name}.augment"] = args.augment == "on"
    params = common.scratch_params(workdir / name, overrides, prepared=prepared)
    config = params.train.model(name)
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    from pipeline.data.prepared import open_prepared
    from pipeline.models.networks import build_network

    norm = open_prepared(prepared).normalization
    train_flops, val_flops = flops_per_image(
        build_network(name, config.net.model_dump(), norm.mean, norm.std),
        config.batch_size,
        config.augment,
    )
    work = {
        "train_images": float(len(train)),
        "val_images": float(len(val)),
        "train_flops": train_flops,
        "val_flops": val_flops,
    }
    parameters = sum(
        p.numel() for p in build_network(name, config.net.model_dump(), 0.0, 1.0).parameters()
    )
    steps = math.ceil(len(train) / 2 / (config.batch_size // 2))
    per_step = allreduce_s(parameters)
    info = {
        "parameters": parameters,
        "allreduce_2_workers": {
            "ms_per_step": per_step * 1e3,
            "steps_per_epoch": steps,
            "s_per_epoch": per_step * steps,
        },
        "epochs": args.epochs,
        "batch_size": config.batch_size,
        "augment": config.augment,
        "train_images": len(train),
        "val_images": len(val),
        "train_mflop_per_image": train_flops / 1e6,
        "val_mflop_per_image": val_flops / 1e6,
    }
    common.log(
        f"{name}: {len(train):,} train / {len(val):,} val images, batch {config.batch_size}, "
        f"augment {config.augment}, {train_flops / 1e6:.1f} MFLOP per training image"
    )
    rows: list[Row] = []
    threads = str(torch.get_num_threads())

    # Reference and Lightning, epoch by epoch in turn.
    common.log(f"{name}: reference and lightning, interleaved, {args.epochs} epochs each")
    reference = ReferenceLoop(name, params, train, val, args.epochs, params.seed)
    pair = lightning_interleaved(name, params, train, val, reference)
    ref_epochs: list[EpochResult] = pair["reference"]
    lit_epochs: list[EpochResult] = pair["lightning"]
    ref_s = steady([e.seconds for e in ref_epochs])
    rows.append(
        make_row(
            name,
            "reference",
            threads,
            [e.seconds for e in ref_epochs],
            ref_s,
            work,
            gemm,
            None,
            ref_epochs[-1].val_accuracy,
            statistics.mean(e.other_cpu_pct for e in ref_epochs),
            {
                "train_s": [round(e.train_s, 3) for e in ref_epochs],
                "val_s": [round(e.val_s, 3) for e in ref_epochs],
            },
        )
    )
    rows.append(
        make_row(
            name,
            "lightning",
            str(pair["threads"]),
            [e.seconds for e in lit_epochs],
            ref_s,
            work,
            gemm,
            pair["fixed_overhead_s"],
            lit_epochs[-1].val_accuracy,
            statistics.mean(e.other_cpu_pct for e in lit_epochs),
        )
    )
    common.log(f"{name}: reference {ref_s:.2f} s/epoch, lightning {rows[-1].epoch_s:.2f}")

    # Ray Train through train_model, each run bracketed by reference epochs.
    if args.ray:
        bracket = ReferenceLoop(name, params, train, val, 2 * len(args.ray) + 1, params.seed)
        uri = f"sqlite:///{workdir / name / 'mlflow.db'}"
        common.init_store(uri, params.mlflow.experiment)
        for ray_config in args.ray:
            before = bracket.epoch() if args.bracket else None
            common.log(f"{name}: {ray_config.label} ...")
            result, share = ray_run(name, params, ray_config, workdir / name, uri)
            after = bracket.epoch() if args.bracket else None
            around = [e.seconds for e in (before, after) if e is not None]
            local_ref = statistics.mean(around) if around else ref_s
            epochs = result["epochs"]
            seconds = epochs.get("per_epoch_s", [])
            rows.append(
                make_row(
                    name,
                    ray_config.label,
                    f"{ray_config.workers}x{ray_config.cpus}",
                    seconds,
                    local_ref,
                    work,
                    gemm,
                    result["fixed_overhead_s"],
                    result["best_val_accuracy"],
                    share.other_pct,
                    {
                        "bracket_reference_s": [round(s, 3) for s in around],
                        "ratio_vs_interleaved_reference": steady(seconds) / ref_s,
                        "train_model_s": result["train_model_s"],
                        "process_wall_s": result["process_wall_s"],
                        "imports_s": result["imports_s"],
                        "phases_s": {k: round(v, 3) for k, v in result["phases_s"].items()},
                        "commit_intervals_s": [
                            round(b - a, 3)
                            for a, b in zip(
                                result["commit_times"], result["commit_times"][1:], strict=False
                            )
                        ],
                        "mlflow": result["mlflow"],
                        "runtime": result["runtime"],
                    },
                )
            )
            row = rows[-1]
            common.log(
                f"{name}: {ray_config.label} {row.epoch_s:.2f} s/epoch ({row.ratio:.2f}x the "
                f"reference {local_ref:.2f} s), fixed {row.fixed_overhead_s:.1f} s, other CPU "
                f"{row.other_cpu_pct:.0f}%"
            )
    return rows, info


# --------------------------------------------------------------------------- targets, report


def ray_fixed_s(phases: dict[str, float]) -> float:
    """Seconds of a Ray run's RAY_FIXED_PHASES."""
    return sum(v for k, v in phases.items() if k.startswith(RAY_FIXED_PHASES))


def evaluate_targets(rows: list[Row], default_path: str) -> list[dict[str, Any]]:
    def find(model: str, path: str) -> Row | None:
        return next((r for r in rows if r.model == model and r.path == path), None)

    targets: list[dict[str, Any]] = []
    for model in dict.fromkeys(r.model for r in rows):
        lit = find(model, "lightning")
        if lit:
            targets.append(
                {
                    "target": f"{model}: Lightning per epoch <= {TARGET_LIGHTNING}x the plain loop",
                    "measured": f"{lit.epoch_s:.2f} vs {lit.reference_epoch_s:.2f} s = "
                    f"{lit.ratio:.3f}x (interleaved)",
                    "value": lit.ratio,
                    "holds": lit.ratio <= TARGET_LIGHTNING,
                }
            )
        one = [r for r in rows if r.model == model and r.path.startswith("ray 1x")]
        for row in one:
            targets.append(
                {
                    "target": f"{model}: Ray Train 1 worker ({row.path}) per epoch <= "
                    f"{TARGET_RAY_ONE}x the plain loop",
                    "measured": f"{row.epoch_s:.2f} vs {row.reference_epoch_s:.2f} s = "
                    f"{row.ratio:.3f}x (reference epochs right before and after)",
                    "value": row.ratio,
                    "holds": row.ratio <= TARGET_RAY_ONE,
                }
            )
            fixed = ray_fixed_s(row.details["phases_s"])
            outside = row.fixed_overhead_s or float("nan")
            targets.append(
                {
                    "target": f"{model}: Ray Train 1 worker ({row.path}) fixed overhead "
                    f"(Ray start, worker group start, teardown) <= {TARGET_FIXED_S:g} s",
                    "measured": f"{fixed:.1f} s; all of train_model outside the epochs "
                    f"{outside:.1f} s (with the MLflow run's opening, the export and the "
                    f"logged model), plus {row.details['imports_s']:.1f} s of imports in a "
                    "fresh process",
                    "value": fixed,
                    "holds": fixed <= TARGET_FIXED_S,
                }
            )
        ones = [r for r in one if r.path.startswith("ray 1x")]
        twos = [r for r in rows if r.model == model and r.path.startswith("ray 2x")]
        if ones and twos:
            best_one = min(ones, key=lambda r: r.epoch_s)
            for two in twos:
                # Compared as ratios to each run's own bracketing reference: the two runs are
                # minutes apart, and foreign load may differ between them.
                targets.append(
                    {
                        "target": f"{model}: Ray Train 2 workers ({two.path}) per epoch <= "
                        f"1 worker ({best_one.path})",
                        "measured": f"{two.epoch_s:.2f} vs {best_one.epoch_s:.2f} s "
                        f"(vs their references: {two.ratio:.3f}x vs {best_one.ratio:.3f}x)",
                        "value": two.epoch_s / best_one.epoch_s,
                        "holds": two.epoch_s <= best_one.epoch_s,
                    }
                )
        if model == "cnn":
            default = find(model, default_path) or lit
            if default:
                targets.append(
                    {
                        "target": f"cnn: training >= {TARGET_CNN_GEMM:.0%} of the measured "
                        f"float32 GEMM FLOP/s ({default.path}, the default path)",
                        "measured": f"{default.gflops:.1f} GFLOP/s = {default.gemm_fraction:.1%}",
                        "value": default.gemm_fraction,
                        "holds": default.gemm_fraction >= TARGET_CNN_GEMM,
                    }
                )
    return targets


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    gemm = report["gemm"]
    lines = [
        "# Training benchmark: the project's paths vs a plain PyTorch loop",
        "",
        f"Run {report['started']} by `bench/training.py {' '.join(report['argv'])}`, "
        f"commit {env['git_commit']}, on {env['cpu']} ({env['cpus']} CPUs, "
        f"{env['memory_gib']} GiB), torch {env['versions'].get('torch')} "
        f"({env['torch_cpu_capability']}, {env['torch_threads']} threads), Lightning "
        f"{env['versions'].get('lightning')}, Ray {env['versions'].get('ray')}, MLflow "
        f"{env['versions'].get('mlflow')}. Load average at the start: "
        f"{', '.join(map(str, env['load_average_at_start']))}.",
        "",
        f"- **Ceiling**: float32 GEMM (torch.mm, 2048x2048, best of repeats), "
        f"{gemm['all_threads_gflops']:.1f} GFLOP/s on {gemm['threads']} threads (the best of "
        f"samples at the start and after each model: "
        f"{', '.join(f'{g:.1f}' for g in gemm['samples'])}), "
        f"{gemm['one_thread_gflops']:.1f} GFLOP/s on 1 thread.",
        "- **Per epoch**: seconds from one epoch's start to the next one's: training, "
        "validation and whatever the path does between epochs (metrics, checkpoint, report "
        "to Ray); the median over the epochs after the first (warm-up) when there are 3 or "
        "more. Ray rows: measured on the rank-0 worker. `x ref`: that over the reference; "
        "Lightning's reference epochs alternate with its own, each Ray run's reference is one "
        "epoch right before and one right after it.",
        "- **GFLOP/s**: FLOPs of matrix multiplies and convolutions (torch FlopCounterMode on "
        "one batch: forward + backward for training images, forward for validation images) "
        "per epoch over the per-epoch time; `% GEMM` is that over the ceiling.",
        "- **Fixed**: seconds outside the epochs. Lightning: `trainer.fit` setup and "
        "teardown. Ray: all of `train_model` but its epochs (Ray start, MLflow run, worker "
        "group, the last checkpoint, export and logged model, Ray shutdown); not the "
        "process's imports (listed below). The target counts Ray's share: Ray start, "
        "worker group start and end, Ray shutdown (`Ray fixed overhead` below).",
        f"- **Allocator**: every path runs with the glibc malloc settings "
        f"{env.get('malloc_env') or 'of glibc (defaults)'} (`--allocator`).",
        "- **other CPU**: CPU used by processes outside this benchmark's own process tree "
        "while the row ran, in % of one CPU (near 0: undisturbed).",
        "",
    ]
    for model, info in report["models"].items():
        lines += [
            f"## {model.upper()}",
            "",
            f"{info['train_images']:,} training and {info['val_images']:,} validation images, "
            f"batch {info['batch_size']}, augmentation {'on' if info['augment'] else 'off'} "
            f"in every path, {info['epochs']} epochs; {info['train_mflop_per_image']:.1f} "
            f"MFLOP per training image, {info['val_mflop_per_image']:.1f} per validation image. "
            f"Two workers all-reduce {info['parameters']:,} gradients "
            f"({info['parameters'] * 4 / 2**20:.1f} MiB) at each of their "
            f"{info['allreduce_2_workers']['steps_per_epoch']} steps per epoch: "
            f"{info['allreduce_2_workers']['ms_per_step']:.2f} ms per all-reduce between two "
            f"idle gloo processes on this machine, "
            f"{info['allreduce_2_workers']['s_per_epoch']:.2f} s per epoch at the least.",
            "",
            "| path | workers x threads | s/epoch | x ref | first epoch s | images/s "
            "| GFLOP/s | % GEMM | fixed s | val acc | other CPU |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in (r for r in report["rows"] if r["model"] == model):
            lines.append(
                f"| {row['path']} | {row['threads']} | {row['epoch_s']:.2f} | "
                f"{row['ratio']:.3f} | {row['first_epoch_s']:.2f} | "
                f"{common.fmt(row['images_per_s'], 0)} | {row['gflops']:.1f} | "
                f"{row['gemm_fraction']:.1%} | {common.fmt(row['fixed_overhead_s'])} | "
                f"{row['val_accuracy']:.4f} | {row['other_cpu_pct']:.0f}% |"
            )
        ray_rows = [
            r for r in report["rows"] if r["model"] == model and r["path"].startswith("ray")
        ]
        if ray_rows:
            lines += ["", "Where a Ray run's time goes (seconds):", ""]
            phases = list(ray_rows[0]["details"]["phases_s"])
            lines.append("| phase | " + " | ".join(r["path"] for r in ray_rows) + " |")
            lines.append("| --- |" + " ---: |" * len(ray_rows))
            for phase in phases:
                values = [common.fmt(r["details"]["phases_s"].get(phase), 2) for r in ray_rows]
                lines.append(f"| {phase} | " + " | ".join(values) + " |")
            extra = [
                (
                    "Ray fixed overhead (start, worker group start and end, shutdown)",
                    lambda r: ray_fixed_s(r["details"]["phases_s"]),
                ),
                ("train_model total", lambda r: r["details"]["train_model_s"]),
                ("imports in the fresh process", lambda r: r["details"]["imports_s"]),
                ("MLflow: driver calls", lambda r: r["details"]["mlflow"]["driver_calls_s"]),
                (
                    "MLflow: per-epoch logging (controller), all epochs",
                    lambda r: sum(r["details"]["mlflow"]["per_epoch_logging_s"]),
                ),
                (
                    "MLflow: system-metrics thread CPU",
                    lambda r: r["details"]["mlflow"]["system_metrics_thread_cpu_s"],
                ),
            ]
            for label, get in extra:
                lines.append(
                    f"| {label} | " + " | ".join(common.fmt(get(r), 2) for r in ray_rows) + " |"
                )
        lines.append("")
    lines += ["## Targets", ""]
    for target in report["targets"]:
        mark = "PASS" if target["holds"] else "MISS"
        lines.append(f"- **{mark}** {target['target']}: {target['measured']}")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def auto_notes(rows: list[Row], env: dict[str, Any]) -> list[str]:
    notes = []
    for row in rows:
        if row.other_cpu_pct >= common.DISTURBED_PCT:
            notes.append(
                f"{row.model} {row.path}: other processes used {row.other_cpu_pct:.0f}% of a "
                "CPU while it ran: this row is disturbed."
            )
    if env["busy_processes_at_start"]:
        notes.append("Busy at the start: " + "; ".join(env["busy_processes_at_start"]))
    return notes


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp,cnn")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every path (4)")
    parser.add_argument("--limit", type=int, help="train on this many images (default: all)")
    parser.add_argument(
        "--augment",
        choices=("params", "on", "off"),
        default="params",
        help="augmentation in every path: as params.yaml has it per model (CNN on, MLP off), "
        "or on/off for all",
    )
    parser.add_argument(
        "--ray",
        default="1x2,2x1",
        help="Ray Train runs as WORKERSxCPUS, comma-separated ('' for none); default 1x2,2x1",
    )
    parser.add_argument(
        "--allocator",
        choices=("project", "default"),
        default="project",
        help="glibc malloc settings of every path: the project's training processes' "
        "(pipeline/training/ray_env.py TRAINING_ENV, the default) or glibc's defaults",
    )
    parser.add_argument("--no-bracket", dest="bracket", action="store_false",
                        help="no reference epochs around the Ray runs")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="2 epochs on 5,000 images")
    parser.add_argument("--workdir", type=Path, help="keep data, store, logs here (else temp)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS)
    parser.add_argument("--name", help="results file name (default training, training-quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = 2, args.limit or 5000
    args.models = [m for m in args.models.split(",") if m]
    args.ray = [RayConfig.parse(t) for t in args.ray.split(",") if t]
    args.name = args.name or ("training-quick" if args.quick else "training")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = TRAINING_ENV if args.allocator == "project" else dict.fromkeys(TRAINING_ENV, "")
    if any(os.environ.get(k, "") != v for k, v in wanted.items()):
        # Every path, the reference included, runs with the allocator settings of the
        # project's training processes, so the ratios compare frameworks, not malloc
        # settings. glibc reads them at process start: run this script again with them.
        env = {k: v for k, v in (os.environ | wanted).items() if v}
        arguments = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, __file__, *arguments], env)
    # Lightning's banners (accelerators, tips) say nothing about the measurement.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started, workdir = common.begin("training", args.workdir)
    env = common.environment()
    common.log(f"workdir {workdir}; load average {env['load_average_at_start']}")
    prepared = common.prepared_data(workdir, args.limit)
    threads = torch.get_num_threads()
    samples = [common.gemm_flops()]
    one_thread = common.gemm_flops(threads=1)
    common.log(
        f"GEMM {samples[0] / 1e9:.1f} GFLOP/s on {threads} threads, {one_thread / 1e9:.1f} on 1"
    )
    rows: list[Row] = []
    models: dict[str, Any] = {}
    for name in args.models:
        found, info = bench_model(name, args, prepared, workdir, max(samples))
        rows += found
        models[name] = info
        samples.append(common.gemm_flops())  # a burst of foreign load only lowers one sample
    gemm = max(samples)
    for row in rows:  # against the best ceiling of the run
        flops = row.gflops * 1e9
        row.gemm_fraction = flops / gemm
    default = common.scratch_params(workdir, {}).train.scaling
    default_path = f"ray {default.num_workers}x{default.cpus_per_worker}"
    report: dict[str, Any] = {
        "started": started,
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": env,
        "gemm": {
            "threads": threads,
            "samples": [s / 1e9 for s in samples],
            "all_threads_gflops": gemm / 1e9,
            "one_thread_gflops": one_thread / 1e9,
        },
        "default_path": default_path,
        "models": models,
        "rows": [asdict(r) for r in rows],
        "targets": evaluate_targets(rows, default_path),
        "notes": auto_notes(rows, env),
    }
    text = markdown(report)
    common.write_results(args.name, report, text, args.out_dir)
    common.finish(workdir, bool(args.workdir), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
