"""The `tune` section of params.yaml: what each model's search samples, and how it runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, model_validator

from pipeline.config.base import MODEL_NAMES, Dropout, ModelName, StrictModel
from pipeline.config.nets import Channels, HiddenSizes

Bound = TypeVar("Bound", bound=float)
Choice = TypeVar("Choice")


class Range(StrictModel, Generic[Bound]):
    """[low, high]; the search samples lr log-uniformly, dropout uniformly (pipeline/tune)."""

    low: Bound
    high: Bound

    @classmethod
    def model_parametrized_name(cls, params: tuple[Any, ...]) -> str:
        return "Range"  # what error messages call it, not `Range[Annotated[float, Gt]]`

    @model_validator(mode="after")
    def _ordered(self) -> Range[Bound]:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def __contains__(self, value: object) -> bool:
        return isinstance(value, float) and self.low <= value <= self.high


def _unique(values: list[Choice]) -> list[Choice]:
    if len({repr(v) for v in values}) != len(values):
        raise ValueError("choices must differ from each other")
    return values


Choices = Annotated[list[Choice], Field(min_length=1), AfterValidator(_unique)]


class StartPoint(StrictModel):
    """A whole configuration, tried before the sampled ones (e.g. the current defaults); each
    model's subclass adds its net's width."""

    lr: PositiveFloat
    dropout: Dropout
    batch_size: PositiveInt


class SearchSpace(StrictModel):
    """What one model's search samples. `epochs` is each trial's budget (ASHA's max_t). Each
    model's subclass adds its net's width choices, under `WIDTH_KEY`, then `start_from`."""

    num_samples: PositiveInt = Field(description="trials in the search")
    epochs: PositiveInt = Field(description="max epochs per trial; ASHA stops the weak earlier")
    lr: Range[PositiveFloat]
    dropout: Range[Dropout]
    batch_size: Choices[PositiveInt]
    WIDTH_KEY: ClassVar[str] = ""
    if TYPE_CHECKING:
        # Each subclass declares it after the width, where params.yaml has it.
        start_from: Sequence[StartPoint]

    def width(self) -> list[list[int]]:
        widths: list[list[int]] = getattr(self, self.WIDTH_KEY)
        return widths

    def start_points(self) -> list[dict[str, Any]]:
        return [point.model_dump() for point in self.start_from]

    @model_validator(mode="after")
    def _points_inside(self) -> SearchSpace:
        allowed: dict[str, Any] = dict(lr=self.lr, dropout=self.dropout, batch_size=self.batch_size)
        allowed[self.WIDTH_KEY] = self.width()
        for index, values in enumerate(self.start_points()):
            for key, within in allowed.items():
                if values[key] not in within:
                    ranged = isinstance(within, Range)
                    problem = f"is outside {key} [low, high]" if ranged else "is not a choice"
                    raise ValueError(f"start_from.{index}.{key}: {values[key]} {problem}")
        if len(self.start_from) > self.num_samples:
            count, limit = len(self.start_from), self.num_samples
            raise ValueError(f"start_from: {count} points, more than num_samples ({limit})")
        return self


class MLPPoint(StartPoint):
    hidden_sizes: HiddenSizes


class CNNPoint(StartPoint):
    channels: Channels


class MLPSearch(SearchSpace):
    WIDTH_KEY: ClassVar[str] = "hidden_sizes"
    hidden_sizes: Choices[HiddenSizes]
    start_from: list[MLPPoint] = []


class CNNSearch(SearchSpace):
    WIDTH_KEY: ClassVar[str] = "channels"
    channels: Choices[Channels]
    start_from: list[CNNPoint] = []


class AshaConfig(StrictModel):
    grace_period: PositiveInt = Field(default=2, description="epochs before a trial can stop")
    reduction_factor: Annotated[int, Field(ge=2)] = 2


class TrialScaling(StrictModel):
    """Ray Train workers of one trial (GPUs: as `train.scaling.use_gpu`)."""

    num_workers: PositiveInt = 1
    cpus_per_worker: PositiveInt = 1


class TuneConfig(StrictModel):
    scaling: TrialScaling = TrialScaling()
    max_concurrent_trials: PositiveInt | None = Field(
        default=None, description="null: as many trials as the cluster's CPUs (GPUs) fit"
    )
    train_limit: PositiveInt | None = Field(
        default=None, description="train each trial on this many images (seeded); null: all"
    )
    scheduler: AshaConfig = AshaConfig()
    # Defaults for a params file without the section; params.yaml states its own.
    mlp: MLPSearch = MLPSearch.model_validate(
        {"num_samples": 12, "epochs": 6, "batch_size": [64, 128, 256]}
        | {"lr": {"low": 3e-4, "high": 1e-2}, "dropout": {"low": 0.0, "high": 0.4}}
        | {"hidden_sizes": [[256], [512, 256], [1024, 512]]}
    )
    cnn: CNNSearch = CNNSearch.model_validate(
        {"num_samples": 8, "epochs": 4, "batch_size": [64, 128, 256]}
        | {"lr": {"low": 1e-3, "high": 3e-2}, "dropout": {"low": 0.0, "high": 0.3}}
        | {"channels": [[16, 32, 64], [32, 64, 128], [32, 64, 128, 256]]}
    )

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        for name in MODEL_NAMES:
            space = self.model(name)
            if self.scheduler.grace_period > space.epochs:
                raise ValueError(
                    f"scheduler.grace_period ({self.scheduler.grace_period}) exceeds "
                    f"{name}.epochs ({space.epochs})"
                )
            uneven = [b for b in space.batch_size if b % self.scaling.num_workers]
            if uneven:
                raise ValueError(
                    f"{name}.batch_size: {uneven} not a multiple of scaling.num_workers "
                    f"({self.scaling.num_workers})"
                )
        return self

    def model(self, name: ModelName) -> SearchSpace:
        return self.mlp if name == "mlp" else self.cnn
