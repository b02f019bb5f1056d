"""The MLP and CNN as plain `nn.Module`s, sized by plain numbers; each normalises its input:
float32 images in [0, 1], (N, 28, 28) or (N, 1, 28, 28), to logits (N, 10)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.config.base import ModelName

NUM_CLASSES = 10
IMAGE_SIZE = 28


class Normalize(nn.Module):
    """Standardise raw [0, 1] pixels with the training set's statistics (kept as buffers)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return (x - self.mean) / self.std


class MLP(nn.Module):
    def __init__(
        self, hidden_sizes: Sequence[int], dropout: float, mean: float, std: float
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
        width = IMAGE_SIZE * IMAGE_SIZE
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden)]
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """Conv-BN-ReLU-pool blocks: pooling early keeps it cheap on a CPU."""

    def __init__(self, channels: Sequence[int], dropout: float, mean: float, std: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [Normalize(mean, std)]
        inputs, size = 1, IMAGE_SIZE
        for width in channels:
            layers += [nn.Conv2d(inputs, width, kernel_size=3, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            inputs, size = width, size // 2
        layers += [nn.Flatten(), nn.Dropout(dropout), nn.Linear(inputs * size * size, NUM_CLASSES)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


NETWORKS: dict[ModelName, type[MLP] | type[CNN]] = {"mlp": MLP, "cnn": CNN}


def build_network(kind: ModelName, net: Mapping[str, Any], mean: float, std: float) -> nn.Module:
    return NETWORKS[kind](**net, mean=mean, std=std)


class Probabilities(nn.Module):
    """A network's logits as class probabilities: the form the model is served in."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)
