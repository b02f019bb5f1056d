"""Shared fixtures: real MNIST through the mirror, small profiles of the real params."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.config.env import Settings
from pipeline.config.params import Params, parse_params, with_overrides
from pipeline.data import prepare
from testkit.data import (
    OUTPUT_PATHS,
    REPO,
    fetch_and_prepare,
    mirror_folder,
    params_under,
    raw_params,
)
from testkit.processes import copy_repo, free_port, running, wait_for_http
from testkit.registry import champion, register_model

# Shared with the test modules, which import them from here.
__all__ = ["REPO", "copy_repo", "free_port", "raw_params", "register_model", "wait_for_http"]
__all__ += ["with_overrides"]

# A profile small enough for seconds-long fits on 2 cores, still real MNIST.
SMALL = {
    # Two workers (DDP), although the repo's default on 2 CPUs is one: the tests are about
    # distributed training, restarts and sharding.
    "train.scaling.num_workers": 2,
    "train.scaling.cpus_per_worker": 1,
    "prepare.train_limit": 2500,
    "prepare.val_size": 500,
    "prepare.test_limit": 1000,
    "train.mlp.epochs": 3,
    "train.cnn.epochs": 3,
}


def small_params(root: Path, **overrides: Any) -> Params:
    """Repo params on the SMALL profile, with every path under `root`."""
    return params_under(root, SMALL | overrides, "test params")


def local_store(folder: Path) -> Settings:
    """Settings that track into a SQLite store inside `folder` (never the repo's)."""
    return Settings(mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback: SQL backend, artifacts served through it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "2",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # As infra/mlflow/entrypoint.sh: no server-side job runner (seven more processes).
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running(command, f"{url}/health", root / "server.log", env):
        yield url


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """One local 2-CPU Ray for the session; train_model joins it instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mirror() -> Path:
    return mirror_folder()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw files fetched through the real fetch stage, and the SMALL profile prepared."""
    root = tmp_path_factory.mktemp("data")
    fetch_and_prepare(small_params(root))
    return root


@pytest.fixture
def params(data_root: Path, tmp_path: Path) -> Params:
    """SMALL-profile params reading the shared prepared data, writing under `tmp_path`."""
    outputs = {f"paths.{k}": str(tmp_path / k) for k in OUTPUT_PATHS}
    return small_params(
        data_root,
        **outputs,
        **{"train.storage_path": str(tmp_path / "ray")},
    )


@dataclass(frozen=True)
class Registry:
    """A real MLflow store holding a well-trained CNN under `@champion`."""

    uri: str
    name: str
    params: Params  # the full-data profile the model was trained on
    net: Any  # the in-memory network (torch.nn.Module)


@pytest.fixture(scope="session")
def registry(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Full MNIST prepared, a CNN trained 3 epochs in-process (about a minute), registered."""
    root = tmp_path_factory.mktemp("registry")
    overrides = {f"paths.{k}": str(root / k) for k in OUTPUT_PATHS} | {
        "paths.raw": str(data_root / "raw"),
        "paths.prepared": str(root / "prepared"),
        "train.cnn.net.channels": [16, 32, 64],
        "train.cnn.epochs": 3,
        "train.cnn.augment": False,
    }
    params = parse_params(with_overrides(raw_params(), overrides), "full profile")
    prepare.run(params)
    uri, net = champion(params, root)
    return Registry(uri, params.mlflow.registered_model, params, net)


@dataclass(frozen=True)
class Service:
    """A running service: its URL, the registry it serves from, its pid (for /proc)."""

    url: str
    registry: Registry
    pid: int


@pytest.fixture(scope="module")
def service(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`mnist-pipeline serve` as a real process on loopback, serving the registry's champion."""
    root = tmp_path_factory.mktemp("service")
    port = free_port()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": registry.uri,
        "SERVING_CACHE_DIR": str(root / "cache"),
        "SERVING_POLL_INTERVAL_S": "0.5",
        "SERVING_MAX_BODY_BYTES": str(2 * 1024 * 1024),
        "SERVING_MAX_IMAGES": "600",
    }
    command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/health/ready", root / "service.log", env=env) as process:
        yield Service(url, registry, process.pid)


def served_split(service: Service) -> tuple[Any, Any]:
    """The service's registry's test split: uint8 images, labels."""
    from pipeline.data.prepared import open_prepared

    test = open_prepared(Path(service.registry.params.paths.prepared)).load("test")
    return test.images, test.labels
