"""The training benchmark's in-process workloads: the reference loop, Lightning, FLOPs."""

import math
import multiprocessing
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch.utils.flop_counter import FlopCounterMode

from bench.common import CpuMeter, log
from pipeline.data.prepared import open_prepared
from pipeline.models.module import Classifier, random_affine, to_unit_float
from pipeline.models.networks import build_network
from pipeline.training.worker import EVAL_BATCH, EpochHistory, RngState, make_loaders
from testkit.processes import free_port


def network(name: Any, params: Any) -> torch.nn.Module:
    norm = open_prepared(Path(params.paths.prepared)).normalization
    return build_network(name, params.train.model(name).net.model_dump(), norm.mean, norm.std)


def flops_per_image(net: torch.nn.Module, batch: int, augment: bool) -> tuple[float, float]:
    """(training, evaluation) FLOPs per image: FlopCounterMode on a batch (matmuls, convs)."""
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(net.train()(random_affine(x) if augment else x), y).backward()
    with FlopCounterMode(display=False) as evaluation, torch.no_grad():
        net.eval()(x)
    return train.get_total_flops() / batch, evaluation.get_total_flops() / batch


def _rank(rank: int, port: int, numel: int, steps: int, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gradients, started = torch.ones(numel), 0.0
    for step in range(steps + 5):  # 5 to warm up
        if step == 5:
            started = time.perf_counter()
        dist.all_reduce(gradients)
    out.put((time.perf_counter() - started) / steps)
    dist.destroy_process_group()


def allreduce_s(numel: int, steps: int = 100) -> float:
    """Seconds per all-reduce of `numel` float32 between two idle one-thread gloo processes."""
    context, port = multiprocessing.get_context("spawn"), free_port()
    out = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, port, numel, steps, out)) for r in (0, 1)]
    for process in ranks:
        process.start()
    seconds = max(float(out.get(timeout=300)) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    return seconds


class ReferenceLoop:
    """Plain PyTorch: the project's network, loss, optimiser, schedule; the splits as tensors."""

    def __init__(self, name: Any, params: Any, epochs: int, device: str = "cpu") -> None:
        self.config, self.device = params.train.model(name), device
        data = open_prepared(Path(params.paths.prepared))
        self.train, self.val = (
            (torch.from_numpy(s.images).to(device), torch.from_numpy(s.labels).long().to(device))
            for s in (data.load("train"), data.load("val"))
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            # As the project trains it: Classifier makes the conv weights channels-last.
            net = network(name, params).to(device)
            self.net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self.rng = torch.get_rng_state()
        # On a GPU as Lightning's "bf16-mixed": autocast around forward and loss.
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device != "cpu")
        lr, steps = self.config.lr, epochs * math.ceil(len(self.train[1]) / self.config.batch_size)
        decay = self.config.weight_decay
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, lr, total_steps=steps)

    def epoch(self) -> CpuMeter:
        (images, labels), config, meter = self.train, self.config, CpuMeter()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            self.net.train()
            for index in torch.randperm(len(labels), device=self.device).split(config.batch_size):
                x, y = to_unit_float(images.index_select(0, index)), labels.index_select(0, index)
                with self.autocast:
                    logits = self.net(random_affine(x) if config.augment else x)
                    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
            self.rng = torch.get_rng_state()
        (images, labels), correct = self.val, torch.zeros((), device=self.device)
        with torch.no_grad(), self.autocast:
            for first in range(0, len(labels), EVAL_BATCH):
                logits = self.net.eval()(to_unit_float(images[first : first + EVAL_BATCH]))
                correct += (logits.argmax(1) == labels[first : first + EVAL_BATCH]).sum()
        self.val_accuracy = float(correct) / len(labels)  # waits for the device
        return meter.stop()


class Interleave(pl.Callback):
    """Times Lightning's epochs, start to start, each after a reference epoch (not timed)."""

    def __init__(self, reference: ReferenceLoop, history: EpochHistory) -> None:
        self.reference, self.history, self.meter = reference, history, CpuMeter()
        self.epochs, self.references = list[CpuMeter](), list[CpuMeter]()

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.on_train_end(trainer, module)
        self.references.append(self.reference.epoch())
        log(f"  reference epoch {self.references[-1].wall_s:.2f} s")
        self.meter = CpuMeter()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.references and len(self.epochs) < len(self.references):
            self.epochs.append(self.meter.stop())


def lightning_interleaved(name: Any, params: Any, reference: ReferenceLoop) -> Interleave:
    config, data = params.train.model(name), open_prepared(Path(params.paths.prepared))
    pl.seed_everything(params.seed, verbose=False)
    train, val = data.load("train"), data.load("val")
    loaders = make_loaders(train, val, config.batch_size, 0, 1, params.seed)
    history = EpochHistory(config.epochs)
    clock = Interleave(reference, history)
    # As the project's workers: no checkpoints, logger, progress bar, summary, sanity check.
    off = ("enable_checkpointing", "logger", "enable_progress_bar", "enable_model_summary")
    quiet: dict[str, Any] = dict.fromkeys(off, False) | {"num_sanity_val_steps": 0}
    quiet["accelerator"] = "cpu"  # as the reference
    trainer = pl.Trainer(max_epochs=config.epochs, callbacks=[clock, history, RngState()], **quiet)
    trainer.fit(Classifier(network(name, params), config), *loaders)
    return clock
