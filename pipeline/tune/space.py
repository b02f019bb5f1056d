"""The search space of `tune.<model>` in Tune's terms, and what a trial's values make of params."""

from __future__ import annotations

import hashlib
import json
import shlex
from typing import Any

from ray import tune

from pipeline.config.base import ModelName
from pipeline.config.params import Params, leaves, parse_params, with_overrides
from pipeline.config.search import SearchSpace


def tune_space(space: SearchSpace) -> dict[str, Any]:
    """Widths as JSON strings: Optuna's categorical choices must be scalars."""
    return {
        "lr": tune.loguniform(space.lr.low, space.lr.high),
        "dropout": tune.uniform(space.dropout.low, space.dropout.high),
        "batch_size": tune.choice(list(space.batch_size)),
        space.WIDTH_KEY: tune.choice([json.dumps(width) for width in space.width()]),
    }


def describe_space(space: SearchSpace) -> dict[str, Any]:
    return {
        "lr": {"loguniform": [space.lr.low, space.lr.high]},
        "dropout": {"uniform": [space.dropout.low, space.dropout.high]},
        "batch_size": {"choice": space.batch_size},
        space.WIDTH_KEY: {"choice": space.width()},
        "epochs": {"max": space.epochs},
    }


def overrides(space: SearchSpace, name: ModelName, config: dict[str, Any]) -> dict[str, Any]:
    net = {
        space.WIDTH_KEY: json.loads(config[space.WIDTH_KEY]),
        "dropout": float(config["dropout"]),
    }
    sampled = {"batch_size": int(config["batch_size"]), "lr": float(config["lr"]), "net": net}
    return {"train": {name: {"epochs": space.epochs} | sampled}}


def set_param_args(changes: dict[str, Any]) -> list[str]:
    """`dvc exp run -S` arguments that set `changes` (leaves only; lists without spaces)."""
    return [
        f"{key}={json.dumps(value, separators=(',', ':'))}"
        if isinstance(value, list)
        # repr: a float keeps every digit and stays a float (`1e-05`, `0.0031`)
        else f"{key}={value!r}"
        for key, value in leaves(changes).items()
    ]


def apply_command(changes: dict[str, Any]) -> str:
    return "dvc exp run " + " ".join(f"-S {shlex.quote(arg)}" for arg in set_param_args(changes))


def trial_params(params: Params, name: ModelName, config: dict[str, Any] | None = None) -> Params:
    """What a trial trains with: params on `tune.scaling`'s workers, with its sampled `config`."""
    scaling = params.tune.scaling.model_dump() | {"use_gpu": params.train.scaling.use_gpu}
    changes = {} if config is None else leaves(overrides(params.tune.model(name), name, config))
    raw = with_overrides(params.model_dump(mode="json"), {"train.scaling": scaling} | changes)
    source = "params with tune.scaling" if config is None else f"params of a {name} trial {config}"
    return parse_params(raw, source)


def fingerprint(params: Params, name: ModelName, data_digest: str) -> str:
    """What a search depends on: a search is only resumed under the same fingerprint."""
    train = params.model_dump(mode="json")["train"]
    fixed = {k: v for k, v in train[name].items() if k not in ("lr", "batch_size", "epochs")}
    searched = ("dropout", "hidden_sizes", "channels")
    fixed["net"] = {k: v for k, v in fixed["net"].items() if k not in searched}
    kept = {"use_gpu": train["scaling"]["use_gpu"], "max_failures": train["max_failures"]}
    key = {"model": name, "seed": params.seed, "train": kept | {name: fixed}, "data": data_digest}
    key["tune"] = tune_section(params, name)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def tune_section(params: Params, name: ModelName) -> dict[str, Any]:
    dumped = params.model_dump(mode="json")["tune"]
    return {k: v for k, v in dumped.items() if k not in ("mlp", "cnn")} | {name: dumped[name]}
