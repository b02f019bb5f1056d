"""The exported model: weights plus everything that rebuilds it, in one pickle-free file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config.base import ModelName, StrictModel
from pipeline.config.nets import NET_CONFIGS, NetConfig
from pipeline.data.atomic import atomic_path
from pipeline.data.prepared import CLASSES, Normalization
from pipeline.models.networks import build_network

MODEL_FILE = "model.pt"


class ModelSpec(StrictModel):
    """What a model is, independent of params.yaml."""

    kind: ModelName
    net: dict[str, Any]
    mean: float
    std: float
    classes: list[str] = list(CLASSES)
    data_digest: str
    epoch: int
    val_accuracy: float
    run_id: str | None = None  # the MLflow run that trained it

    def build(self) -> nn.Module:
        net = NET_CONFIGS[self.kind].model_validate(self.net)
        return build_network(self.kind, net.model_dump(), self.mean, self.std)

    @classmethod
    def describe(
        cls,
        kind: ModelName,
        net: NetConfig,
        normalization: Normalization,
        data_digest: str,
        epoch: int,
        val_accuracy: float,
        run_id: str | None = None,
    ) -> ModelSpec:
        return cls(
            kind=kind,
            net=net.model_dump(mode="json"),
            mean=normalization.mean,
            std=normalization.std,
            data_digest=data_digest,
            epoch=epoch,
            val_accuracy=val_accuracy,
            run_id=run_id,
        )


def save_model(folder: Path, net: nn.Module, spec: ModelSpec) -> Path:
    """`folder/model.pt`, the whole folder appearing at once."""
    with atomic_path(folder) as staged:
        staged.mkdir()
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save({"spec": spec.model_dump(mode="json"), "state_dict": state}, staged / MODEL_FILE)
    return folder / MODEL_FILE


def load_model(folder: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the network from `folder/model.pt` alone, in eval mode."""
    path = folder / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the model first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.model_validate(payload["spec"])
    net = spec.build()
    net.load_state_dict(payload["state_dict"])
    return net.eval(), spec


def state_dict_from_lightning(checkpoint: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The network's weights and the epoch of a Lightning checkpoint of `Classifier`."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    prefix = "net."
    state = {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    return state, int(payload["epoch"])
