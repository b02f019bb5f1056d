"""`params.yaml` as validated pydantic models: the one source of configuration."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import yaml
from pydantic import (
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

from pipeline.config.base import ModelName, StrictModel
from pipeline.config.nets import CNNNetConfig, MLPNetConfig, NetConfig
from pipeline.config.search import TuneConfig

MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000
NetT = TypeVar("NetT", bound=NetConfig, covariant=True)
DEFAULT_PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """Invalid parameters; the message names each offending key path."""


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


class OptimConfig(StrictModel):
    epochs: PositiveInt
    batch_size: PositiveInt = Field(description="global batch size, split across workers")
    lr: PositiveFloat = Field(description="peak learning rate of the one-cycle schedule")
    weight_decay: NonNegativeFloat = 0.0
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    augment: bool = False


class ModelTrainConfig(OptimConfig, Generic[NetT]):
    """`train.<model>`: the optimisation, and the network it trains."""

    net: NetT


class ScalingConfig(StrictModel):
    num_workers: PositiveInt = 1
    cpus_per_worker: PositiveInt = 2
    use_gpu: Literal["auto"] | bool = "auto"


class TrainConfig(StrictModel):
    scaling: ScalingConfig = ScalingConfig()
    storage_path: str = ".ray_results"
    max_failures: NonNegativeInt = 0
    mlp: ModelTrainConfig[MLPNetConfig]
    cnn: ModelTrainConfig[CNNNetConfig]

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

    def model(self, name: ModelName) -> ModelTrainConfig[NetConfig]:
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
        message = item["msg"].removeprefix("Value error, ") + (f" (got {value!r})" if shown else "")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {path}: {message}")
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


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, the keys of `with_overrides`; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= leaves(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_params(raw: Any, source: str = "params") -> Params:
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
    try:
        raw = yaml.load(path.read_text(), Loader=ParamsLoader)  # a SafeLoader: no objects
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, str(path))
