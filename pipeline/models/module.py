"""One LightningModule for every network: loss, metrics, optimiser and schedule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pipeline.config.params import OptimConfig
from pipeline.models.networks import NUM_CLASSES

Batch = tuple[torch.Tensor, torch.Tensor]


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]: the networks' input contract."""
    return images.unsqueeze(1).to(torch.float32).div_(255.0)


def random_affine(images: torch.Tensor) -> torch.Tensor:
    """Small random rotations, scalings and shifts, as handwriting varies (float input)."""
    n = images.shape[0]
    angle = (torch.rand(n, device=images.device) * 2 - 1) * 0.17  # about 10 degrees
    scale = 1 + (torch.rand(n, device=images.device) * 2 - 1) * 0.1
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = scale * torch.cos(angle)
    theta[:, 0, 1] = -scale * torch.sin(angle)
    theta[:, 1, 0] = scale * torch.sin(angle)
    theta[:, 1, 1] = scale * torch.cos(angle)
    theta[:, :, 2] = (torch.rand(n, 2, device=images.device) * 2 - 1) * 0.15  # about 2 pixels
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


class Classifier(pl.LightningModule):
    """Trains any digit network; logs `train/loss`, `val/loss` and `val/accuracy`."""

    def __init__(self, net: nn.Module, optim: OptimConfig) -> None:
        super().__init__()
        self.save_hyperparameters({"optim": optim.model_dump()})
        # Channels-last conv weights make every activation channels-last: oneDNN's fast path on
        # CPUs (bench/README.md), tensor cores' on GPUs; same outputs, and exported models are
        # rebuilt from the state_dict in the usual layout.
        self.net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optim = optim
        self.val_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._samples = 0

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        x = to_unit_float(images)
        if self.optim.augment:
            x = random_affine(x)
        loss = F.cross_entropy(self(x), labels, label_smoothing=self.optim.label_smoothing)
        # The epoch's batch-weighted mean loss, logged once at the last batch, before the
        # epoch-end hooks that read it: `self.log` on every step is costly (bench/README.md).
        self._loss_sum += loss.detach() * len(labels)
        self._samples += len(labels)
        if self.trainer.is_last_batch:
            mean = self._loss_sum / self._samples
            self.log("train/loss", mean, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(to_unit_float(images))
        self.val_accuracy(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/accuracy", self.val_accuracy, on_epoch=True)

    def configure_optimizers(self) -> Any:
        lr, steps = self.optim.lr, int(self.trainer.estimated_stepping_batches)
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=lr, weight_decay=self.optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
