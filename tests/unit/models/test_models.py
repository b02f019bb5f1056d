"""The networks learn: a real MNIST subset, a short CPU fit, loss falls, accuracy clears a floor."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from pipeline.config.base import ModelName
from pipeline.config.params import Params
from pipeline.data.prepared import open_prepared
from pipeline.evaluate import evaluate
from pipeline.models.artifact import ModelSpec, load_model, save_model
from pipeline.models.module import Classifier, random_affine, to_unit_float
from pipeline.models.networks import build_network
from testkit.registry import fit_plain

# Floors after 3 short epochs on 2000 images; a broken model or loop sits near 10%.
FLOORS: dict[ModelName, float] = {"mlp": 0.85, "cnn": 0.85}


def _fit(params: Params, name: ModelName) -> tuple[Classifier, list[float]]:
    pl.seed_everything(params.seed, verbose=False)
    data = open_prepared(Path(params.paths.prepared))
    train = data.load("train")
    config = params.train.model(name)
    net = build_network(
        name, config.net.model_dump(), data.normalization.mean, data.normalization.std
    )
    module = Classifier(net, config)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    fit_plain(module, train, 64, config.epochs, [Record()])
    return module, losses


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_model_learns_on_real_subset(params: Params, name: ModelName) -> None:
    module, losses = _fit(params, name)
    assert losses[-1] < losses[0] * 0.6, f"{name} loss did not fall: {losses}"
    test = open_prepared(Path(params.paths.prepared)).load("test")
    result = evaluate(module.net, test)
    assert result.accuracy >= FLOORS[name], f"{name} test accuracy {result.accuracy:.3f}"


def test_same_seed_same_model(params: Params) -> None:
    first, _ = _fit(params, "mlp")
    second, _ = _fit(params, "mlp")
    for (key, a), b in zip(
        first.net.state_dict().items(), second.net.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), f"{key} differs between two runs with the same seed"


def test_exported_model_rebuilds_alone_and_predicts_the_same(
    params: Params, tmp_path: Path
) -> None:
    data = open_prepared(Path(params.paths.prepared))
    config = params.train.cnn
    net = build_network(
        "cnn", config.net.model_dump(), data.normalization.mean, data.normalization.std
    ).eval()
    spec = ModelSpec.describe("cnn", config.net, data.normalization, data.digest, 0, 0.5)
    save_model(tmp_path / "cnn", net, spec)
    rebuilt, loaded_spec = load_model(tmp_path / "cnn")
    assert loaded_spec == spec
    images = to_unit_float(torch.from_numpy(data.load("val").images[:64]))
    with torch.no_grad():
        assert torch.equal(net(images), rebuilt(images))


def test_augmentation_keeps_digits_recognisable() -> None:
    torch.manual_seed(0)
    images = torch.zeros(8, 1, 28, 28)
    images[:, :, 8:20, 12:16] = 1.0  # a vertical bar, like a "1"
    moved = random_affine(images)
    assert moved.shape == images.shape
    # Small shifts/rotations move ink around but neither erase nor multiply it.
    ink_ratio = moved.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    assert torch.all((ink_ratio > 0.7) & (ink_ratio < 1.3))
    assert not torch.allclose(moved, images)
