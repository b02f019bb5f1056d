"""The networks' architectures, as `train.<model>.net` and model.pt state them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, PositiveInt

from pipeline.config.base import Dropout, ModelName, StrictModel


class NetConfig(StrictModel):
    """One network's architecture; `WIDTH_KEY` names its width, what a search chooses."""

    WIDTH_KEY: ClassVar[str]


class MLPNetConfig(NetConfig):
    WIDTH_KEY: ClassVar[str] = "hidden_sizes"
    hidden_sizes: list[PositiveInt] = Field(min_length=1)
    dropout: Dropout = 0.2


class CNNNetConfig(NetConfig):
    WIDTH_KEY: ClassVar[str] = "channels"
    # Each block halves the resolution (28 -> 14 -> 7 -> 3 -> 1), hence at most four.
    channels: list[PositiveInt] = Field(min_length=1, max_length=4)
    dropout: Dropout = 0.1


NET_CONFIGS: dict[ModelName, type[NetConfig]] = {"mlp": MLPNetConfig, "cnn": CNNNetConfig}
