"""What every section of params.yaml shares: strict models, the model names, dropout."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ModelName = Literal["mlp", "cnn"]
MODEL_NAMES: tuple[ModelName, ...] = ("mlp", "cnn")
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


class StrictModel(BaseModel):
    # strict: `epochs: true` or `lr: "0.1"` are mistakes, not values to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, serialize_by_alias=True)
