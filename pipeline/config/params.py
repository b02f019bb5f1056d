"""`params.yaml` as validated pydantic models: the one source of configuration."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000
ModelName = Literal["mlp", "cnn"]
MODEL_NAMES: tuple[ModelName, ...] = ("mlp", "cnn")
DEFAULT_PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """Invalid parameters; the message names each offending key path."""


class StrictModel(BaseModel):
    # strict: `epochs: true` or `lr: "0.1"` are mistakes, not values to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, serialize_by_alias=True)


class PathsConfig(StrictModel):
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    models: str = "models"
    metrics: str = "metrics"
    plots: str = "plots"
    reports: str = "reports"
    tune: str = "tune"  # the best configuration each search found (`mnist-pipeline tune`)


class FetchConfig(StrictModel):
    mirrors: list[str] = Field(min_length=1)
    timeout_s: PositiveFloat = 30.0


class PrepareConfig(StrictModel):
    # Subsets for quick profiles (tests, smoke runs); null keeps the full split.
    train_limit: PositiveInt | None = Field(default=None, le=MNIST_TRAIN_SIZE)
    test_limit: PositiveInt | None = Field(default=None, le=MNIST_TEST_SIZE)
    val_size: PositiveInt = 5000

    @field_validator("val_size")
    @classmethod
    def _val_smaller_than_train(cls, val_size: int, info: ValidationInfo) -> int:
        available = info.data.get("train_limit") or MNIST_TRAIN_SIZE
        if val_size >= available:
            raise ValueError(f"must be smaller than the training images available ({available})")
        return val_size


Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


class MLPNetConfig(StrictModel):
    hidden_sizes: list[PositiveInt] = Field(min_length=1)
    dropout: Dropout = 0.2


class CNNNetConfig(StrictModel):
    # Each block halves the resolution (28 -> 14 -> 7 -> 3 -> 1), hence at most four.
    channels: list[PositiveInt] = Field(min_length=1, max_length=4)
    dropout: Dropout = 0.1


class OptimConfig(StrictModel):
    epochs: PositiveInt
    batch_size: PositiveInt = Field(description="global batch size, split across workers")
    lr: PositiveFloat = Field(description="peak learning rate of the one-cycle schedule")
    weight_decay: NonNegativeFloat = 0.0
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    augment: bool = False


class MLPTrainConfig(OptimConfig):
    net: MLPNetConfig


class CNNTrainConfig(OptimConfig):
    net: CNNNetConfig


class ScalingConfig(StrictModel):
    num_workers: PositiveInt = 1
    cpus_per_worker: PositiveInt = 2
    use_gpu: Literal["auto"] | bool = "auto"


class TrainConfig(StrictModel):
    scaling: ScalingConfig = ScalingConfig()
    storage_path: str = ".ray_results"
    max_failures: NonNegativeInt = 0
    mlp: MLPTrainConfig
    cnn: CNNTrainConfig

    @field_validator("mlp", "cnn")
    @classmethod
    def _batches_split_evenly(cls, model: OptimConfig, info: ValidationInfo) -> OptimConfig:
        scaling = info.data.get("scaling")
        if scaling is not None and model.batch_size % scaling.num_workers:
            raise ValueError(
                f"batch_size ({model.batch_size}) must be a multiple of "
                f"train.scaling.num_workers ({scaling.num_workers})"
            )
        return model

    def model(self, name: ModelName) -> MLPTrainConfig | CNNTrainConfig:
        return self.mlp if name == "mlp" else self.cnn


class EvaluateConfig(StrictModel):
    batch_size: PositiveInt = 1000
    misclassified_grid: PositiveInt = Field(default=36, le=100)


class MlflowConfig(StrictModel):
    experiment: str = Field(default="mnist", min_length=1)
    registered_model: str = Field(default="mnist-classifier", min_length=1)


class RegisterConfig(StrictModel):
    # Test-accuracy margin a challenger needs over the champion to replace it.
    min_improvement: Annotated[float, Field(ge=0.0, le=1.0)] = 0.001


class LogUniform(StrictModel):
    low: PositiveFloat
    high: PositiveFloat

    @model_validator(mode="after")
    def _ordered(self) -> LogUniform:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def __contains__(self, value: object) -> bool:
        return isinstance(value, float) and self.low <= value <= self.high


class DropoutRange(StrictModel):
    low: Dropout
    high: Dropout

    @model_validator(mode="after")
    def _ordered(self) -> DropoutRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def __contains__(self, value: object) -> bool:
        return isinstance(value, float) and self.low <= value <= self.high


def _unique(values: list[Any]) -> list[Any]:
    if len({repr(v) for v in values}) != len(values):
        raise ValueError("choices must differ from each other")
    return values


CnnChannels = Annotated[list[PositiveInt], Field(min_length=1, max_length=4)]


class MLPPoint(StrictModel):
    """A whole configuration, tried before the sampled ones (e.g. the current defaults)."""

    lr: PositiveFloat
    dropout: Dropout
    batch_size: PositiveInt
    hidden_sizes: list[PositiveInt]


class CNNPoint(StrictModel):
    """A whole configuration, tried before the sampled ones (e.g. the current defaults)."""

    lr: PositiveFloat
    dropout: Dropout
    batch_size: PositiveInt
    channels: CnnChannels


class SearchSpace(StrictModel):
    """What one model's search samples. `epochs` is each trial's budget (ASHA's max_t)."""

    num_samples: PositiveInt = Field(description="trials in the search")
    epochs: PositiveInt = Field(description="max epochs per trial; ASHA stops the weak earlier")
    lr: LogUniform
    dropout: DropoutRange
    batch_size: list[PositiveInt] = Field(min_length=1)
    WIDTH_KEY: ClassVar[str] = ""

    @field_validator("batch_size")
    @classmethod
    def _unique_batches(cls, values: list[int]) -> list[int]:
        return _unique(values)

    def width(self) -> list[list[int]]:
        """The choices of network width (hidden sizes or channels)."""
        raise NotImplementedError

    def start_points(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _check_points(self, points: list[MLPPoint] | list[CNNPoint]) -> None:
        for index, point in enumerate(points):
            values = point.model_dump()
            where = f"start_from.{index}"
            if values["lr"] not in self.lr:
                raise ValueError(f"{where}.lr: {values['lr']} is outside lr [low, high]")
            if values["dropout"] not in self.dropout:
                raise ValueError(
                    f"{where}.dropout: {values['dropout']} is outside dropout [low, high]"
                )
            if values["batch_size"] not in self.batch_size:
                raise ValueError(f"{where}.batch_size: {values['batch_size']} is not a choice")
            if values[self.WIDTH_KEY] not in self.width():
                raise ValueError(
                    f"{where}.{self.WIDTH_KEY}: {values[self.WIDTH_KEY]} is not a choice"
                )
        if len(points) > self.num_samples:
            raise ValueError(
                f"start_from: {len(points)} points, more than num_samples ({self.num_samples})"
            )


class MLPSearch(SearchSpace):
    hidden_sizes: list[Annotated[list[PositiveInt], Field(min_length=1)]] = Field(min_length=1)
    start_from: list[MLPPoint] = []
    WIDTH_KEY: ClassVar[str] = "hidden_sizes"

    @field_validator("hidden_sizes")
    @classmethod
    def _unique_widths(cls, values: list[list[int]]) -> list[list[int]]:
        return _unique(values)

    @model_validator(mode="after")
    def _points_inside(self) -> MLPSearch:
        self._check_points(self.start_from)
        return self

    def width(self) -> list[list[int]]:
        return self.hidden_sizes

    def start_points(self) -> list[dict[str, Any]]:
        return [point.model_dump() for point in self.start_from]


class CNNSearch(SearchSpace):
    channels: list[CnnChannels] = Field(min_length=1)
    start_from: list[CNNPoint] = []
    WIDTH_KEY: ClassVar[str] = "channels"

    @field_validator("channels")
    @classmethod
    def _unique_widths(cls, values: list[list[int]]) -> list[list[int]]:
        return _unique(values)

    @model_validator(mode="after")
    def _points_inside(self) -> CNNSearch:
        self._check_points(self.start_from)
        return self

    def width(self) -> list[list[int]]:
        return self.channels

    def start_points(self) -> list[dict[str, Any]]:
        return [point.model_dump() for point in self.start_from]


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
    mlp: MLPSearch = MLPSearch(
        num_samples=12,
        epochs=6,
        lr=LogUniform(low=3e-4, high=1e-2),
        dropout=DropoutRange(low=0.0, high=0.4),
        batch_size=[64, 128, 256],
        hidden_sizes=[[256], [512, 256], [1024, 512]],
    )
    cnn: CNNSearch = CNNSearch(
        num_samples=8,
        epochs=4,
        lr=LogUniform(low=1e-3, high=3e-2),
        dropout=DropoutRange(low=0.0, high=0.3),
        batch_size=[64, 128, 256],
        channels=[[16, 32, 64], [32, 64, 128], [32, 64, 128, 256]],
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

    def model(self, name: ModelName) -> MLPSearch | CNNSearch:
        return self.mlp if name == "mlp" else self.cnn


class Params(StrictModel):
    seed: NonNegativeInt = 42
    paths: PathsConfig = PathsConfig()
    fetch: FetchConfig
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    # `register` would shadow BaseModel.register (ABCMeta); the YAML key stays `register`.
    register_: RegisterConfig = Field(default=RegisterConfig(), alias="register")
    tune: TuneConfig = TuneConfig()

    @model_validator(mode="after")
    def _train_split_covers_workers(self) -> Params:
        train_size = (self.prepare.train_limit or MNIST_TRAIN_SIZE) - self.prepare.val_size
        if train_size < self.train.scaling.num_workers:
            raise ValueError("the training split is smaller than train.scaling.num_workers")
        return self


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, each naming its key path (`train.cnn.lr`)."""
    lines = [f"invalid parameters in {source}:"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        value = item.get("input")
        shown = item["type"] != "missing" and not isinstance(value, dict | list)
        got = f" (got {value!r})" if shown else ""
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key")
        else:
            lines.append(f"  {path}: {message}{got}")
    return "\n".join(lines)


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted keys (`train.cnn.lr`) set."""
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return result


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a params mapping; raise `ParamsError` naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, source)) from None


class ParamsLoader(yaml.SafeLoader):
    """YAML 1.1, plus YAML 1.2's floats without a dot (`1e-05`): what `dvc exp run -S` writes
    for a value such as 0.00001, which plain PyYAML would read as a string."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file."""
    try:
        raw = yaml.load(path.read_text(), Loader=ParamsLoader)  # a SafeLoader: no objects
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))
