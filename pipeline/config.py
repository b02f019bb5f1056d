"""`params.yaml` as validated pydantic models: the one source of configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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
    num_workers: PositiveInt = 2
    cpus_per_worker: PositiveInt = 1
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


def load_params(path: Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))
