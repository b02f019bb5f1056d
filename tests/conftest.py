"""Shared fixtures: real MNIST through the mirror, small profiles of the real params."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config.env import Settings
from pipeline.config.params import Params, parse_params, with_overrides
from pipeline.data import fetch, prepare

REPO = Path(__file__).resolve().parents[1]

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


DATA_PATHS = ("raw", "prepared")
OUTPUT_PATHS = ("models", "metrics", "plots", "reports")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_http(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 90
) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(
    command: list[str], url: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process for the block (given to it, e.g. for its pid); stop it afterwards."""
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_http(url, process, log)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def copy_repo(target: Path) -> None:
    """The tracked files (what a fresh clone has), as a new git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)


def mirror_folder() -> Path:
    """The offline MNIST mirror: $MNIST_MIRROR, or ../shared/mnist beside the checkout."""
    folder = Path(os.environ.get("MNIST_MIRROR") or REPO.parent / "shared" / "mnist")
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST mirror not found at {folder}: set MNIST_MIRROR")
    return folder


def raw_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def small_params(root: Path, **overrides: Any) -> Params:
    """Repo params on the SMALL profile, with every path under `root`."""
    paths = {f"paths.{k}": str(root / k) for k in (*DATA_PATHS, *OUTPUT_PATHS)}
    paths["train.storage_path"] = str(root / "ray")
    raw = with_overrides(raw_params(), SMALL | paths | overrides)
    return parse_params(raw, "test params")


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
    with running(command, f"{url}/health", root / "server.log"):
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
def data_root(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """Raw files fetched through the real fetch stage, and the SMALL profile prepared."""
    root = tmp_path_factory.mktemp("data")
    params = small_params(root)
    fetch.run(params, Settings(mnist_mirror=str(mirror)))
    prepare.run(params)
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


def register_model(uri: str, name: str, net: Any, example: Any, accuracy: float) -> str:
    """Log `net` in a new run as the pipeline does and register it; return the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.registry.versions import Candidate, ensure_version
    from pipeline.tracking.manifest import MANIFEST_TAG
    from pipeline.tracking.model_log import log_model
    from pipeline.tracking.runs import ensure_experiment

    mlflow.set_tracking_uri(uri)
    ensure_experiment(uri, "test-serving")
    mlflow.set_experiment("test-serving")
    with mlflow.start_run() as run:
        model_uri = log_model(net, example, metadata={})
    client = MlflowClient(uri)
    tags = client.get_run(run.info.run_id).data.tags
    candidate = Candidate(
        model_type="cnn",
        run_id=run.info.run_id,
        model_uri=model_uri,
        test_accuracy=accuracy,
        test_loss=0.0,
        tags={MANIFEST_TAG: tags[MANIFEST_TAG]},
    )
    return str(ensure_version(client, name, candidate).version)


@pytest.fixture(scope="session")
def registry(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Full MNIST prepared, a CNN trained 3 epochs in-process (about a minute), registered."""
    import lightning.pytorch as pl
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.prepared import open_prepared
    from pipeline.evaluate import evaluate
    from pipeline.models.module import Classifier
    from pipeline.models.networks import build_network
    from pipeline.registry.versions import promote

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
    data = open_prepared(Path(params.paths.prepared))
    pl.seed_everything(params.seed, verbose=False)
    net = build_network(
        "cnn", params.train.cnn.net.model_dump(), data.normalization.mean, data.normalization.std
    )
    train = data.load("train")
    loader = DataLoader(
        TensorDataset(torch.from_numpy(train.images), torch.from_numpy(train.labels).long()),
        batch_size=params.train.cnn.batch_size,
        shuffle=True,
    )
    pl.Trainer(
        max_epochs=params.train.cnn.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(Classifier(net, params.train.cnn), loader)
    net.eval()
    accuracy = evaluate(net, data.load("test")).accuracy
    uri = f"sqlite:///{root / 'mlflow.db'}"
    example = data.load("val").images[:2].astype(np.float32) / 255.0
    name = params.mlflow.registered_model
    version = register_model(uri, name, net, example, accuracy)
    promote(MlflowClient(uri), name, version, pause_s=0.0)
    return Registry(uri, name, params, net)


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
