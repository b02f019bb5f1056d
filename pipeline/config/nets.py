"""The networks' architectures, as `train.<model>.net` and model.pt state them."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt

from pipeline.config.base import Dropout, ModelName, StrictModel

# The widths a network and a search (`pipeline.config.search`) accept alike.
HiddenSizes = Annotated[list[PositiveInt], Field(min_length=1)]
# Each block halves the resolution (28 -> 14 -> 7 -> 3 -> 1), hence at most four.
Channels = Annotated[list[PositiveInt], Field(min_length=1, max_length=4)]


class NetConfig(StrictModel):
    """One network's architecture."""


class MLPNetConfig(NetConfig):
    hidden_sizes: HiddenSizes
    dropout: Dropout = 0.2


class CNNNetConfig(NetConfig):
    channels: Channels
    dropout: Dropout = 0.1


NET_CONFIGS: dict[ModelName, type[NetConfig]] = {"mlp": MLPNetConfig, "cnn": CNNNetConfig}
